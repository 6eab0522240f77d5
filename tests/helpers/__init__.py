"""Code the tests and benchmarks share, kept out of the shipped packages: the multi-process runner,
memory probes and the slow reference kernels."""
