"""Locks that keep two runs off the same files.

A run holds `RunLock` on what it writes: the output target (a lock file beside it), the checkpoint
folder, a folder of disk activations. The locks are ``flock`` locks taken through the `filelock`
library, so the operating system drops them when the process dies: a killed run never blocks the
next one. A second run is refused at once (no waiting) with one line naming the run that holds the
lock, read from the lock file, where the holder writes its process id, host, start time and command.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from filelock import FileLock, Timeout

from .errors import PruningError


def describe_process() -> dict:
    """Who we are, for the lock file: process id, host, start time and command line."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
                                 *sys.argv[1:]])[:300]}


def read_holder(path: str) -> str:
    """The run named in lock file ``path`` ('process 1234 on host, started ...: command'), or a
    general description when the file says nothing readable."""
    try:
        with open(path, encoding="utf-8") as handle:
            owner = json.load(handle)
        return (f"process {owner['pid']} on {owner['host']}, started {owner['started']}"
                f"{': ' + owner['command'] if owner.get('command') else ''}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another optimum-prune run"


_HELD: dict[str, list] = {}  # lock path -> [FileLock, holders in this process]


class RunLock:
    """An exclusive, non-blocking lock on ``path`` (a lock file) for what it guards (``what``, used
    in the message). ``acquire`` raises `PruningError` naming the holder when another process has
    it. Within one process the lock is shared: several `RunLock` objects on one path (the CLI's and
    the `Pruner`'s view of one checkpoint folder) all hold it, and it is released with the last."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = os.path.abspath(os.fspath(path))
        self.what = what
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> "RunLock":
        if self._held:
            return self
        entry = _HELD.get(self.path)
        if entry is None:
            lock = FileLock(self.path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise PruningError(f"{self.what} is in use by {read_holder(self.path)}; wait for that run to finish, "
                                   f"or choose another folder.") from None
            except OSError as err:
                raise PruningError(f"Cannot create the lock file {self.path} ({err.strerror or err}); "
                                   f"make its folder writable or choose another one.") from None
            entry = _HELD[self.path] = [lock, 0]
            try:
                with open(self.path, "w", encoding="utf-8") as handle:  # same inode: the lock is unaffected
                    json.dump(describe_process(), handle)
            except OSError:
                pass  # the lock holds without the description
        entry[1] += 1
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        entry = _HELD[self.path]
        entry[1] -= 1
        if entry[1]:
            return
        del _HELD[self.path]
        try:  # removed while still held: a run that opened it just before sees a deleted file
            os.remove(self.path)
        except OSError:
            pass
        entry[0].release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_stale(path: str) -> bool:
    """Whether lock file ``path`` exists and no live process holds it (its run was killed)."""
    if not os.path.isfile(path):
        return False
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except (Timeout, OSError):
        return False
    lock.release()
    return True
