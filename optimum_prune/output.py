"""Where a run writes, and how: checked before the work starts, locked, replaced atomically.

The policy (docs/reliability.md, "Output folders"):

- ``--output`` is a new folder, an empty one, or — with ``--overwrite`` — a previous output of
  optimum-prune, proven so: its ``.optimum-prune-output.json`` (written last by every save) lists
  every file in it, at the size the save wrote. Nothing else is ever replaced.
- It is never the working directory, a home directory, a filesystem root (mount point), the model,
  the data, the checkpoint, activation or offload folders, nor an ancestor of any of them; it is not
  a symbolic link; no two folders a run writes (output, checkpoint, activations, offload) are the
  same or nested.
- The run holds a lock beside the output from the preflight to the end of the save, so a second
  run aiming at the same output is refused at once.
- The new folder is written into a hidden sibling (``.NAME.tmp-XXXX``, noted in the lock file
  before it is made: after a kill, the next run removes the folders noted there and nothing that
  merely looks like them) and swapped in when complete; on Linux the swap with an existing output
  is one atomic ``renameat2(RENAME_EXCHANGE)``, so a kill at any instant leaves the old or the new
  output, never neither. The folder gets the
  permissions ``mkdir`` gives under the user's umask.

`preflight` checks every path of a run in seconds, before the model is loaded; `OutputFolder`
reserves and writes the output.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable

from .errors import PruningError, format_bytes, is_disk_full
from .locks import RunLock


logger = logging.getLogger(__name__)

#: written last into every output folder: the files the save wrote, with their sizes. A folder is a
#: previous output that --overwrite may replace only when this proves every entry in it ours.
OUTPUT_MARKER = ".optimum-prune-output.json"


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def writable(path: str) -> bool:
    """Whether this process may create entries in folder ``path``."""
    return os.access(path, os.W_OK | os.X_OK)


def nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def describe_entry(path: str) -> str:
    """What ``path`` is, for a message: 'a folder', 'a file', 'a FIFO (named pipe)', 'a device file', ..."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a file"


def check_writable_folder(path: str, flag: str) -> None:
    """``path`` is, or can be created as, a folder this process may write into."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise PruningError(f"{flag} {path} is {describe_entry(path)}; choose a folder.")
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise PruningError(f"{flag} {path} cannot be created: {existing} is {describe_entry(existing)}; "
                           f"choose another folder.")
    if not writable(existing):
        raise PruningError(f"{flag} {path} cannot be written: {existing} is read-only for this user; "
                           f"choose a writable location.")


def free_bytes(path: str) -> int:
    """Free bytes on the disk that holds ``path`` (or would hold it: its nearest existing folder)."""
    return shutil.disk_usage(nearest_existing(os.path.abspath(path))).free


def check_free_space(path: str | os.PathLike, needed: int, flag: str = "--output") -> None:
    """Refuse, before the work, an output whose disk cannot hold ``needed`` bytes."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    free = free_bytes(path)
    if free < needed:
        raise PruningError(f"{flag} {path} is on a disk with {format_bytes(free)} free, and the pruned model takes about "
                           f"{format_bytes(needed)}; free space there or choose an output on another disk.")


def _protected(inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> list[tuple[str, str]]:
    """(what, real path) of what an output may never replace: the given inputs and folders in use,
    the working directory and the home directory."""
    protected = [("the working directory", os.getcwd()), ("your home directory", os.path.expanduser("~"))]
    protected += [(what, path) for what, path in inputs if path]
    return [(what, _real(path)) for what, path in protected if os.path.lexists(os.path.expanduser(os.fspath(path)))]


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), flag: str = "Output folder") -> str:
    """Check an output folder against the policy above; returns its absolute path. Writes nothing.

    ``inputs``: (description, path) of what the run reads or writes elsewhere (model folder, data
    files, checkpoint folder, ...): the output may be none of them nor an ancestor of one."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.islink(path):
        raise PruningError(f"{flag} {path} is a symbolic link; give the folder it points to, or a new folder.")
    real = _real(path)
    if os.path.ismount(real) or os.path.dirname(real) == real:
        raise PruningError(f"{flag} {path} is a filesystem root; name a new folder inside it for the pruned model.")
    for what, other in _protected(inputs):
        if other == real:
            raise PruningError(f"{flag} {path} is {what}; name a new folder for the pruned model, "
                               f"e.g. {os.path.join(path, 'pruned')}.")
        if _within(other, real):
            raise PruningError(f"{flag} {path} contains {what} ({other}); name a new folder for the pruned model, "
                               f"e.g. {path.rstrip(os.sep)}-pruned.")
    check_writable_folder(os.path.dirname(path), f"The folder of {flag}")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise PruningError(f"{flag} {path} is {describe_entry(path)}; choose a folder.")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise PruningError(f"{flag} {path} exists and is not empty; choose another folder or pass overwrite "
                               f"(--overwrite) to replace a previous optimum-prune output.")
        reason = not_our_output(path)
        if reason:
            raise PruningError(f"{flag} {path} is not an optimum-prune output as written ({reason}); --overwrite only "
                               f"replaces those: choose another folder, or empty this one yourself.")
    return path


def _entries(folder: str) -> dict[str, int | None]:
    """Every entry under ``folder`` (relative path -> size of a file; None for anything else: a
    folder, a link, a FIFO, ...), links not followed."""
    found = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, folder)
            found[rel] = os.lstat(full).st_size if os.path.isfile(full) and not os.path.islink(full) else None
    return found


def write_marker(folder: str) -> None:
    """Record in ``folder`` (a staging folder, complete) every file the save wrote and its size."""
    from .version import __version__

    files = {rel: size for rel, size in _entries(folder).items() if size is not None}
    with open(os.path.join(folder, OUTPUT_MARKER), "w", encoding="utf-8") as handle:
        json.dump({"written_by": "optimum-prune", "version": __version__, "files": files}, handle, indent=1)


def not_our_output(path: str) -> str | None:
    """Why folder ``path`` is not proven a previous optimum-prune output (None when it is): its
    marker is missing or unreadable, or it holds an entry the marker does not list (a file of the
    user's), or a listed file changed size since the save."""
    marker = os.path.join(path, OUTPUT_MARKER)
    if not os.path.isfile(marker) or os.path.islink(marker):
        return f"no {OUTPUT_MARKER}, the record each save writes"
    try:
        with open(marker, encoding="utf-8") as handle:
            files = json.load(handle)["files"]
        files = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return f"its {OUTPUT_MARKER} is unreadable"
    folders = {folder for name in files for folder in _ancestors(os.path.dirname(name))}
    for rel, size in _entries(path).items():
        if rel == OUTPUT_MARKER or (rel in folders and os.path.isdir(os.path.join(path, rel))
                                    and not os.path.islink(os.path.join(path, rel))):
            continue
        if rel not in files or size is None:
            return f"it holds {rel}, which the save did not write"
        if files[rel] != size:
            return f"{rel} changed since the save wrote it"
    return None


def _ancestors(rel: str) -> list[str]:
    """``a/b/c`` -> [``a/b/c``, ``a/b``, ``a``] (a relative folder and the folders above it)."""
    found = []
    while rel:
        found.append(rel)
        rel = os.path.dirname(rel)
    return found


def check_disjoint(folders: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """No two of the folders a run writes (flag, path) are the same folder or nested."""
    given = [(flag, _real(path)) for flag, path in folders if path]
    for i, (flag_a, a) in enumerate(given):
        for flag_b, b in given[i + 1:]:
            if _within(a, b) or _within(b, a):
                relation = "is" if a == b else "is inside" if _within(a, b) else "contains"
                raise PruningError(f"{flag_a} {relation} {flag_b} ({b}); give each its own folder.")


def preflight(output=None, overwrite: bool = False, checkpoint_dir=None, activation_folder=None, offload_folder=None,
              inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> "OutputFolder | None":
    """Check every path a run will write before any work starts (raises `PruningError`); returns
    the (not yet reserved) `OutputFolder` of ``output``, guarding the inputs and the other folders."""
    writes = [("--output", output), ("--checkpoint-dir", checkpoint_dir), ("--activation-folder", activation_folder),
              ("--offload-folder", offload_folder)]
    check_disjoint(writes)
    for flag, folder in writes[1:]:
        if folder:
            check_writable_folder(os.path.abspath(os.path.expanduser(os.fspath(folder))), flag)
    if not output:
        return None
    in_use = [(f"the {flag} folder", folder) for flag, folder in writes[1:] if folder]
    return OutputFolder(output, overwrite, [*inputs, *in_use], flag="--output")


# ------------------------------------------------------------------------------------------ writing
def exchange_paths(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def remove_tree(path: str) -> None:
    """Delete a folder of ours (a staging folder, or a replaced output); the one place that deletes trees."""
    shutil.rmtree(path)


def remove_empty_folder(path: str) -> bool:
    """Remove folder ``path`` if it is empty (a folder a run created and left nothing in); whether it went."""
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


class OutputFolder:
    """The output target of one run: checked, locked (``.NAME.lock`` beside it) and written atomically.

    Example::

        with OutputFolder("out", overwrite=True, inputs=[("the model", model_dir)]) as output:
            ...                       # hours of work; a second run on "out" is refused meanwhile
            output.write(lambda folder: model.save_pretrained(folder))
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), flag: str = "Output folder"):
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.flag = flag
        self.path = check_output(path, overwrite, self.inputs, flag)
        self.parent, self.name = os.path.split(self.path)
        self.lock = RunLock(os.path.join(self.parent, f".{self.name}.lock"), f"Output folder {self.path}")
        self._created: list[str] = []

    def reserve(self) -> "OutputFolder":
        """Create the parent folder if needed and take the lock (refused if another run holds it)."""
        if not self.lock.held:
            missing = []
            folder = self.parent
            while not os.path.isdir(folder):
                missing.append(folder)
                folder = os.path.dirname(folder)
            os.makedirs(self.parent, exist_ok=True)
            self._created = missing
            self.lock.acquire()
            self._recover()
        return self

    def release(self) -> None:
        """Drop the lock; remove the parent folders `reserve` created if nothing was written there."""
        self.lock.release()
        for folder in self._created:  # deepest first
            if not remove_empty_folder(folder):
                break
        self._created = []

    def __enter__(self) -> "OutputFolder":
        return self.reserve()

    def __exit__(self, *exc) -> None:
        self.release()

    def _ours(self, kind: str) -> list[str]:
        """The ``kind`` folders (``tmp``: staging, ``old``: a previous output moved aside) a killed
        run of this output recorded in its lock file before making them: only those are ours."""
        prefix = os.path.join(self.parent, f".{self.name}.{kind}-")
        made = (self.lock.previous or {}).get("made", [])
        return [path for path in made if isinstance(path, str) and path.startswith(prefix)
                and os.path.dirname(path) == self.parent and os.path.isdir(path) and not os.path.islink(path)]

    def _recover(self) -> None:
        """Under the lock: undo what a killed save of this output left (an output moved aside by the
        two-rename fallback goes back; staging folders are removed): the folders its lock file
        records, nothing found by name alone."""
        for aside in self._ours("old"):
            if not os.path.lexists(self.path):
                logger.warning("Restoring %s, moved aside by an interrupted save.", self.path)
                os.rename(aside, self.path)
            else:
                remove_tree(aside)
        for stray in self._ours("tmp"):
            logger.warning("Removing %s, the temporary folder of an interrupted save.", stray)
            remove_tree(stray)

    def write(self, writer: Callable[[str], None]) -> str:
        """Run ``writer(folder)`` on a new staging folder, then swap it in as the output."""
        self.reserve()
        check_output(self.path, self.overwrite, self.inputs, self.flag)  # again: the folder may have changed meanwhile
        staging = os.path.join(self.parent, f".{self.name}.tmp-{secrets.token_hex(4)}")
        self.lock.record_made(staging)
        os.mkdir(staging)  # mode 0o777 less the umask, as a plain mkdir
        try:
            writer(staging)
            write_marker(staging)
            self._swap_in(staging)
            self.lock.forget_made(staging)
        except BaseException as err:
            if os.path.isdir(staging):
                remove_tree(staging)
            if not os.path.lexists(staging):  # else its note stays in the lock file, for the next run to clean
                self.lock.forget_made(staging)
            if is_disk_full(err):
                raise PruningError(f"No space left on the disk of {self.flag} {self.path} while saving; nothing was "
                                   f"written there: free space or choose an output on another disk.") from None
            raise
        return self.path

    def _swap_in(self, staging: str) -> None:
        if not os.path.isdir(self.path) or not os.listdir(self.path):
            os.replace(staging, self.path)  # atomic over a missing or empty folder
            return
        if exchange_paths(staging, self.path):  # staging now holds the previous output
            remove_tree(staging)
            return
        aside = os.path.join(self.parent, f".{self.name}.old-{secrets.token_hex(4)}")
        self.lock.record_made(aside)
        os.rename(self.path, aside)  # a kill here leaves the old output under `aside`: restored by `_recover`
        os.rename(staging, self.path)
        remove_tree(aside)
        self.lock.forget_made(aside)
