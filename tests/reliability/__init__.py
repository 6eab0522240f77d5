"""Helpers of the fault-injection tests (``tests/test_reliability*.py``); see docs/reliability.md."""
