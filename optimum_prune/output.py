"""Where a run writes, and how: checked before the work starts, locked, replaced atomically.

The policy (docs/reliability.md, "Output folders"):

- ``--output`` is a new folder, an empty one, or — with ``--overwrite`` — a previous output of
  optimum-prune (it holds ``pruning_config.json``). Nothing else is ever replaced.
- It is never the working directory, a home directory, a filesystem root (mount point), the model,
  the data, the checkpoint, activation or offload folders, nor an ancestor of any of them; it is not
  a symbolic link; no two folders a run writes (output, checkpoint, activations, offload) are the
  same or nested.
- The run holds a lock beside the output from the preflight to the end of the save, so a second
  run aiming at the same output is refused at once.
- The new folder is written into a hidden sibling (``.NAME.tmp-XXXX``) and swapped in when
  complete; on Linux the swap with an existing output is one atomic ``renameat2(RENAME_EXCHANGE)``,
  so a kill at any instant leaves the old or the new output, never neither. The folder gets the
  permissions ``mkdir`` gives under the user's umask.

`preflight` checks every path of a run in seconds, before the model is loaded; `OutputFolder`
reserves and writes the output.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable

from .errors import PruningError
from .locks import RunLock


logger = logging.getLogger(__name__)

OUTPUT_MARKER = "pruning_config.json"  # what makes a folder a previous output of optimum-prune


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


def check_writable_folder(path: str, flag: str) -> None:
    """``path`` is, or can be created as, a folder this process may write into."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise PruningError(f"{flag} {path} is a file; choose a folder.")
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise PruningError(f"{flag} {path} cannot be created: {existing} is a file; choose another folder.")
    if not writable(existing):
        raise PruningError(f"{flag} {path} cannot be written: {existing} is read-only for this user; "
                           f"choose a writable location.")


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
    if os.path.isfile(path):
        raise PruningError(f"{flag} {path} is a file; choose a folder.")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise PruningError(f"{flag} {path} exists and is not empty; choose another folder or pass overwrite "
                               f"(--overwrite) to replace a previous optimum-prune output.")
        if not os.path.isfile(os.path.join(path, OUTPUT_MARKER)):
            raise PruningError(f"{flag} {path} is not an optimum-prune output (no {OUTPUT_MARKER}); --overwrite only "
                               f"replaces those: choose another folder, or empty this one yourself.")
    return path


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
        prefix = f".{self.name}.{kind}-"
        return [os.path.join(self.parent, entry) for entry in sorted(os.listdir(self.parent))
                if entry.startswith(prefix) and os.path.isdir(os.path.join(self.parent, entry))]

    def _recover(self) -> None:
        """Under the lock: undo what a killed save of this output left (an output moved aside by the
        two-rename fallback goes back; staging folders are removed)."""
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
        os.mkdir(staging)  # mode 0o777 less the umask, as a plain mkdir
        try:
            writer(staging)
            self._swap_in(staging)
        except BaseException:
            if os.path.isdir(staging):
                remove_tree(staging)
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
        os.rename(self.path, aside)  # a kill here leaves the old output under `aside`: restored by `_recover`
        os.rename(staging, self.path)
        remove_tree(aside)
