"""``python -m helpers.memory_measure OUT_DIR CONFIG [key=value …]``: train, and record peak tensor bytes.

Runs ``translution train`` in this process (start it under torchrun for several ranks) and
writes ``OUT_DIR/rank<R>.json``: for every optimizer step, the peak of live tensor bytes
and the operator that reached it, plus the process's peak RSS for contrast.

What is measured, and why not the trainer's ``peak_memory_gib_*``: on CPU that metric is the
peak resident set size, which includes the interpreter, the torch libraries (about 0.3 GiB
before any tensor), and heap pages freed but not returned to the system, so it overstates
tensor memory by an amount that depends on the machine and the allocator. Subtracting a
baseline does not remove the freed-page part. Instead :class:`LiveTensorBytes` counts the
bytes of every live tensor storage: a dispatch mode sees each operator's outputs (factory
functions included), a weak reference on each storage sees it die in whichever thread drops
it last (gloo's worker threads free collective buffers), and ``UntypedStorage.resize_`` is
wrapped because FSDP2 frees and re-allocates gathered parameters by resizing their storage.
That is ``torch.cuda.max_memory_allocated``'s measure, on the CPU. (The profiler's memory
events were tried first; they miss frees made on threads other than the one profiling.)
Steps after the first are the steady state (optimizer states and pair plans exist).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of CPU/GPU tensor storages created while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [its bytes]
        self._lock = threading.Lock()
        self._resize = torch.UntypedStorage.resize_

    def reset_peak(self) -> None:
        self.peak, self.peak_op = self.live, "(start)"

    def _account(self, storage: torch.UntypedStorage, op: str) -> None:
        if storage.device.type == "meta":
            return
        nbytes = storage.nbytes()
        with self._lock:
            size = self._sizes.get(storage)
            if size is None:  # a new storage: count it until it dies
                size = self._sizes[storage] = [0]
                weakref.finalize(storage, self._release, size)
            self.live += nbytes - size[0]
            size[0] = nbytes
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, op

    def _release(self, size: list[int]) -> None:
        with self._lock:
            self.live -= size[0]

    def _track(self, tensor: torch.Tensor, op: str) -> None:
        self._account(tensor.untyped_storage(), op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, lambda t: self._track(t, str(func.overloadpacket.__name__)), out)
        return out

    def __enter__(self) -> LiveTensorBytes:
        tracker = self
        resize = self._resize

        def resize_(storage: torch.UntypedStorage, size: int) -> None:
            resize(storage, size)
            if storage in tracker._sizes:
                tracker._account(storage, "resize_")

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*exc)


@dataclass(frozen=True)
class StepPeak:
    step: int
    peak_bytes: int
    at_op: str  # the operator whose output reached the peak
    start_bytes: int  # live tensor bytes when the step began


@dataclass(frozen=True)
class Measurement:
    rank: int
    steps: list[StepPeak]
    rss_peak_bytes: int
    rss_before_bytes: int  # peak RSS before the model was built (interpreter and libraries)

    @property
    def steady_peak(self) -> int:
        """Peak live tensor bytes over the steps after the first."""
        later = self.steps[1:] or self.steps
        return max(s.peak_bytes for s in later)


def _engine_classes() -> list[type]:
    """The trainer's engines whose ``train_step`` is one optimizer step."""
    from training.torch_backend import TorchBackend

    classes: list[type] = [TorchBackend]
    try:
        from training.deepspeed_backend import DeepSpeedBackend
    except ImportError:  # DeepSpeed not installed
        return classes
    return [*classes, DeepSpeedBackend]


def measure(train_argv: list[str]) -> Measurement:
    """Run ``translution train *train_argv`` in this process, counting live tensor bytes per step."""
    from launcher.cli import main as cli

    tracker = LiveTensorBytes()
    steps: list[StepPeak] = []
    originals = {cls: cls.train_step for cls in _engine_classes()}

    def measured(step):
        def measured_step(self, *args, **kwargs):
            start = tracker.live
            tracker.reset_peak()
            try:
                return step(self, *args, **kwargs)
            finally:
                steps.append(StepPeak(len(steps) + 1, tracker.peak, tracker.peak_op, start))
        return measured_step

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for cls, step in originals.items():
        cls.train_step = measured(step)
    try:
        with tracker:
            code = cli(["train", *train_argv])
    finally:
        for cls, step in originals.items():
            cls.train_step = step
    if code:
        raise SystemExit(code)
    return Measurement(int(os.environ.get("RANK", "0")), steps,
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_before)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    out = Path(argv[0])
    started = time.perf_counter()
    result = measure(argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    record = {**asdict(result), "steady_peak_bytes": result.steady_peak,
              "seconds": round(time.perf_counter() - started, 1)}
    (out / f"rank{result.rank}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
