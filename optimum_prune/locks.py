"""Locks that keep two runs off the same files.

A run holds `RunLock` on what it writes: the output target (a lock file beside it), the checkpoint
folder, a folder of disk activations. The locks are ``flock`` locks taken through the `filelock`
library, so the operating system drops them when the process dies: a killed run never blocks the
next one. A second run is refused at once (no waiting) with one line naming the run that holds the
lock, read from the lock file, where the holder writes its process id, host, start time and command.
The holder also notes there each temporary path it makes beside what it guards (`RunLock.record_made`)
before making it: after a kill, the next run cleans exactly those (`RunLock.previous`), never
folders that only look like ours.
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


def read_record(path: str) -> dict | None:
    """What lock file ``path`` records (its holder, and the paths that run made: ``made``), or None
    when it holds no record of ours."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and {"pid", "host", "started"} <= set(record) else None


_HELD: dict[str, list] = {}  # lock path -> [FileLock, holders in this process, record, previous record]


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
            previous = read_record(self.path)  # before acquiring: some filelock versions truncate the file
            lock = FileLock(self.path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise PruningError(f"{self.what} is in use by {read_holder(self.path)}; wait for that run to finish, "
                                   f"or choose another folder.") from None
            except OSError as err:
                raise PruningError(f"Cannot create the lock file {self.path} ({err.strerror or err}); "
                                   f"make its folder writable or choose another one.") from None
            entry = _HELD[self.path] = [lock, 0, describe_process(), previous]
            self._write(entry[2])
        entry[1] += 1
        self._held = True
        return self

    @property
    def previous(self) -> dict | None:
        """The record a run killed while holding this lock left in the lock file (None when the
        file was new or held no record of ours): the paths it made are in ``previous["made"]``."""
        entry = _HELD.get(self.path)
        return entry[3] if entry is not None else None

    def record_made(self, path: str) -> None:
        """Note in the lock file, before making it, a path this run makes and removes again (a
        staging folder): the proof a later run needs to clean it up after a kill."""
        entry = _HELD[self.path]
        entry[2].setdefault("made", []).append(os.path.abspath(path))
        self._write(entry[2], required=True)

    def forget_made(self, path: str) -> None:
        """``path`` (noted with `record_made`) is gone or is the output now: no longer ours to clean."""
        entry = _HELD[self.path]
        made = entry[2].get("made", [])
        if os.path.abspath(path) in made:
            made.remove(os.path.abspath(path))
            self._write(entry[2])

    def _write(self, record: dict, required: bool = False) -> None:
        try:
            with open(self.path, "w", encoding="utf-8") as handle:  # same inode: the lock is unaffected
                json.dump(record, handle)
        except OSError as err:
            if required:  # without the note, a kill would leave a folder no later run may remove
                raise PruningError(f"Cannot write the lock file {self.path} ({err.strerror or err}); make its folder "
                                   f"writable or free space there.") from None

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        entry = _HELD[self.path]
        entry[1] -= 1
        if entry[1]:
            return
        del _HELD[self.path]
        if not entry[2].get("made"):  # else kept: the record of what an interrupted write left, for the next run
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
