"""One run per run directory: an exclusive lock that rank 0 holds while its run lives.

Two runs with the same ``run.name`` and ``output_dir`` would write each other's checkpoints and
resume from each other's state. The lock is a ``flock`` on ``RUN_DIR/.lock``: the kernel drops it
when the holding process ends however it ends, so a crashed or killed run never leaves it
stuck, and a restarted run (torchrun, a new pod) takes it again. On a shared file system the
lock holds across machines where the file system implements ``flock`` across clients: NFSv4
(Linux maps ``flock`` to byte-range locks there), CephFS, Lustre mounted with ``-o flock``,
GPFS; on a mount without it (Lustre's default ``noflock``) taking the lock fails with an error
that says so, rather than passing silently.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirectoryLocked(RuntimeError):
    """Another live run holds the run directory."""


def in_use(run_dir: Path, holder: str) -> str:
    return f"{run_dir} is in use by another run ({holder})"


class RunDirectoryLock:
    """Held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirectoryLocked` naming its holder; record this process as holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryLocked(in_use(self.path.parent, holder)) from None
        except OSError as err:
            os.close(fd)
            raise RunDirectoryLocked(f"cannot lock {self.path} ({err.strerror}): the file system does not support "
                                     "flock (e.g. Lustre without -o flock)") from err
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def holder(self) -> str | None:
        """Who holds the lock now (``None``: nobody), without taking it or writing anything."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file: no run has started here
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        except OSError:  # no flock here: acquire() reports that
            return None
        finally:
            os.close(fd)  # also drops the shared lock, if it was taken
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, empty of meaning
            self._fd = None
