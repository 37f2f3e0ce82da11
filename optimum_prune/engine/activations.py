"""Where the calibration activations wait between two decoder layers.

The layer engine passes the hidden states of every calibration batch from one decoder layer to
the next: the inputs of the layer being pruned and the outputs it produces for the next one. For
a large model (or many calibration windows) these two sets are the largest thing the prune holds,
so where they wait is a choice (``activations=`` of `Pruner.prune`, ``--activations`` of the CLI):

``"device"`` (default)
    on the device that produced them (the input embedding's device for the first layer);
``"cpu"``
    in CPU memory — frees the accelerator for the layer and its solver; each batch is copied to
    the compute device when the layer runs;
``"disk"``
    one file per batch in a temporary folder (``activation_folder``, default: the system's temp
    folder); only the batch being processed is in memory. Reading goes through ``read()`` into
    freshly allocated memory (no memory map), so the file pages stay in the OS cache and out of
    the process's resident set.

All three give identical results: the tensors are stored bit for bit.

A disk store's folder (``optimum-prune-activations-XXXX``) is locked by its run
(`optimum_prune.locks.RunLock`); the folders of runs that were killed (their lock is free) are
removed by the next store created beside them, file by file: only the batch files a store writes.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence

import torch

from ..errors import PruningError
from ..fields import ACTIVATION_PLACES
from ..locks import RunLock, is_stale, read_record
from ..output import remove_empty_folder


logger = logging.getLogger(__name__)


PLACES = ACTIVATION_PLACES
FOLDER_PREFIX = "optimum-prune-activations-"
_LOCK_NAME = "store.lock"
_BATCH_NAMES = re.compile(r"batch-[0-9]{6}\.pt")


def check_place(where: str) -> str:
    if where not in PLACES:
        raise PruningError(f"activations must be one of {', '.join(PLACES)} (where the calibration activations wait "
                           f"between layers), got {where!r}.")
    return where


class ActivationStore(Sequence):
    """The hidden states of the calibration batches, in batch order, kept as ``where`` says."""

    def __init__(self, where: str = "device", folder: str | os.PathLike | None = None, sweep: bool = True):
        """``sweep``: first remove the activation folders of killed runs beside the new one
        (`remove_stale_folders`); `like` skips it, the first store of the prune did it."""
        self.where = check_place(where)
        self._tensors: list[torch.Tensor] = []
        self._files: list[str] = []
        self._specs: list[tuple[torch.Size, torch.dtype]] = []
        self._folder = None
        self._lock = None
        if self.where == "disk":
            if folder is not None:
                os.makedirs(folder, exist_ok=True)
            if sweep:
                remove_stale_folders(folder if folder is not None else tempfile.gettempdir())
            self._folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=folder)
            self._lock = RunLock(os.path.join(self._folder, _LOCK_NAME), f"Activation folder {self._folder}").acquire()

    def like(self) -> "ActivationStore":
        """An empty store kept the same way (in a sibling folder on disk)."""
        return ActivationStore(self.where, None if self._folder is None else os.path.dirname(self._folder), sweep=False)

    def append(self, tensor: torch.Tensor) -> None:
        self._specs.append((tensor.shape, tensor.dtype))
        if self.where == "device":
            self._tensors.append(tensor)
        elif self.where == "cpu":
            self._tensors.append(tensor.to("cpu"))
        else:
            path = os.path.join(self._folder, f"batch-{len(self._files):06d}.pt")
            torch.save(tensor.detach().to("cpu").contiguous(), path)
            self._files.append(path)

    def __len__(self) -> int:
        return len(self._files) if self.where == "disk" else len(self._tensors)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if self.where != "disk":
            return self._tensors[index]
        return torch.load(self._files[index], map_location="cpu", weights_only=True, mmap=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]

    def spec(self, index: int) -> tuple[torch.Size, torch.dtype]:
        """Shape and dtype of batch ``index``, without reading it from disk."""
        return self._specs[index]

    def nbytes(self) -> int:
        """Bytes held in memory (0 on disk)."""
        return sum(t.numel() * t.element_size() for t in self._tensors)

    def close(self) -> None:
        """Drop the tensors (and delete the files)."""
        self._tensors = []
        self._files = []
        self._specs = []
        if self._folder is not None:
            _remove_store_files(self._folder)
            if self._lock is not None:
                self._lock.release()
            remove_empty_folder(self._folder)
            self._folder = None

    def __del__(self):  # a store that was never closed (an exception) still removes its folder
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"ActivationStore(where={self.where!r}, batches={len(self)})"


def _remove_store_files(folder: str) -> None:
    """Delete the batch files a store wrote in ``folder`` (nothing else)."""
    for name in os.listdir(folder):
        if _BATCH_NAMES.fullmatch(name):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def remove_stale_folders(parent: str) -> list[str]:
    """Remove the activation folders in ``parent`` left by killed runs: those holding our lock file
    (its record of the run that made the folder) that no live process holds; their batch files and
    the lock go, and the folder if nothing else is in it. A folder merely named like ours is left
    alone. Returns the folders removed."""
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        folder = os.path.join(parent, entry)
        if not entry.startswith(FOLDER_PREFIX) or os.path.islink(folder) or not os.path.isdir(folder):
            continue
        lock = os.path.join(folder, _LOCK_NAME)
        try:
            if read_record(lock) is None or not is_stale(lock):
                continue
            _remove_store_files(folder)
            os.remove(lock)
        except OSError:
            continue
        if remove_empty_folder(folder):
            logger.warning("Removed %s, the activation files of an interrupted run.", folder)
            removed.append(folder)
    return removed
