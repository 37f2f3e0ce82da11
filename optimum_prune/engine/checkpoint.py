"""Checkpoint and resume of a layer-by-layer prune.

After every finished decoder layer the engine hands `LayerCheckpoint.commit` what it changed in
that layer (the pruned weights; for structured pruning the kept units and the restored consumer)
and the inputs of the next layer. A resumed prune replays the saved changes onto the freshly
loaded model, continues from the saved inputs and produces the weights an uninterrupted run
would have produced.

Layout of the folder (safetensors and JSON only: loading a checkpoint never unpickles)::

    checkpoint.json          the commit point: fingerprint, next layer, report, file names
    layer-00000.safetensors  what layer 0 changed (one file per finished layer), RNG state after it
    inputs-00003.safetensors inputs of the next layer (only the latest is kept)
    search.safetensors       a whole-model search in progress (`commit_search`: policy gradient's
                             probabilities and sampler state every few steps)
    decision.safetensors     a whole-model method's decision (`commit_decision`): the units a
                             policy-gradient search or a depth method removes, the RNG state after it
    finish/                  the checkpoint of the layer-wise finish after such a decision (`stage`)
    checkpoint.lock          held by the run using the folder (`optimum_prune.locks.RunLock`)

Files are written under temporary names and renamed; ``checkpoint.json`` is replaced last, so a
kill at any moment leaves either the previous or the new checkpoint, never a mix.

Under several processes (`runtime.distributed`) each process keeps its own checkpoint in
``rank-R-of-N/`` under the folder (the inputs it saves are those of its own windows). The processes
commit a layer together (a barrier before each commit), so a kill can leave them at most one layer
apart: each keeps the inputs of its previous commit too, and a resume starts every process from the
layer all of them finished (`LayerCheckpoint.rewind`).

The checkpoint owns only what it wrote: the names in ``checkpoint.json`` must be the checkpoint's
own file names (anything else, a path elsewhere included, is refused as a corrupt checkpoint), and
`LayerCheckpoint.clear` removes exactly the files ``checkpoint.json`` lists, then the folder if it
is empty. A second run on a folder in use is refused at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time

import torch
from torch import nn

from ..errors import PruningError, first_line, is_disk_full
from ..locks import RunLock
from ..output import remove_empty_folder
from ..runtime.distributed import is_distributed, rank, world_size
from ..runtime.offload import SAFETENSORS_DTYPES, current_value


logger = logging.getLogger(__name__)

STATE_NAME = "checkpoint.json"
LOCK_NAME = "checkpoint.lock"
DECISION_NAME = "decision.safetensors"
SEARCH_NAME = "search.safetensors"
STAGES = ("finish",)  # the later stages of a prune, each a checkpoint in its own subfolder (`stage`)
_FILE_NAMES = re.compile(r"(layer|inputs)-[0-9]{5}\.safetensors|(decision|search)\.safetensors")  # the names it writes
_PROCESS_FOLDERS = re.compile(r"rank-([0-9]+)-of-([0-9]+)")  # each process's own, under several processes
CHECKPOINT_VERSION = 1
_RNG_KEY = "__rng_state__"


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def save_batches(batches, path: str) -> None:
    """Write the tensors of ``batches`` (a sequence; an `ActivationStore` reads them from disk one at
    a time) as a safetensors file with keys "0", "1", ..., holding one batch in memory at a time; the
    header comes from the store's shapes and dtypes, so each batch is read once."""
    header, offset = {}, 0
    for i in range(len(batches)):
        shape, dtype = batches.spec(i) if hasattr(batches, "spec") else (batches[i].shape, batches[i].dtype)
        nbytes = shape.numel() * dtype.itemsize
        header[str(i)] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for x in batches:
            handle.write(_tensor_bytes(x))


def fingerprint(model: nn.Module, config, calibration: torch.Tensor | None) -> dict[str, str]:
    """Digests of what determines the result: the model (architecture and input embeddings), the
    pruning config and the calibration token ids."""
    model_config = getattr(model, "config", None)
    arch = model_config.to_dict() if model_config is not None else {"class": type(model).__name__}
    for key in ("pruning_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        arch.pop(key, None)
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = current_value(embeddings) if getattr(embeddings, "weight", None) is not None else None
    if weight is not None and weight.device.type != "meta":
        digest.update(_tensor_bytes(weight))
    settings = config.to_dict()
    settings.pop("optimum_prune_version", None)
    return {
        "model": digest.hexdigest(),
        "config": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "calibration": "none" if calibration is None else hashlib.sha256(_tensor_bytes(calibration)).hexdigest(),
    }


def open_whole(checkpoint: "LayerCheckpoint | None", model: nn.Module, config, windows: torch.Tensor | None,
               num_layers: int) -> tuple[tuple[dict[str, torch.Tensor], dict] | None, float]:
    """Open ``checkpoint`` for a whole-model method (policy gradient, depth): (the decision an
    interrupted run committed, or None; the seconds that run spent). ``(None, 0.0)`` without one."""
    if checkpoint is None:
        return None, 0.0
    checkpoint.begin(fingerprint(model, config, windows), num_layers)
    return checkpoint.decision(), checkpoint.state.get("seconds", 0.0)


def nested(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under ``prefix.`` keys, to be saved beside others in one checkpoint file."""
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def unnested(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors `nested` saved under ``prefix.``, with their own keys."""
    return {key[len(prefix) + 1:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


_WHAT = {
    "model": "a different model (architecture or weights)",
    "config": "a different pruning config",
    "calibration": "different calibration data",
}


class LayerCheckpoint:
    """A checkpoint folder for one prune.

    Args:
        directory: where checkpoints go (created if needed).
        resume: continue from the checkpoint found there. Without it a folder that already holds
            a checkpoint is refused (so that a typo cannot silently throw away hours of work).
    """

    def __init__(self, directory: str | os.PathLike, resume: bool = False, per_process: bool = True):
        self.folder = os.path.abspath(os.fspath(directory))  # the folder the user named
        self.directory = self.folder  # this process's checkpoint: the folder, or its rank-R-of-N subfolder
        self.per_process = per_process  # False for a stage's subfolder, already inside this process's folder
        if per_process and is_distributed():
            self.directory = os.path.join(self.folder, f"rank-{rank()}-of-{world_size()}")
        self.resume = resume
        self.state: dict | None = None
        self.stages: dict[str, LayerCheckpoint] = {}
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise PruningError(f"Checkpoint path {self.directory} is a file; choose a folder.")
        self.lock = RunLock(os.path.join(self.directory, LOCK_NAME), f"Checkpoint folder {self.directory}")

    def acquire(self) -> None:
        """Create the folder if needed and lock it for this run (refused while another run holds it)."""
        if self.lock.held:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise PruningError(f"Cannot create the checkpoint folder {self.directory} ({err.strerror or err}); "
                               f"choose a writable location.") from None
        self.lock.acquire()

    def release(self) -> None:
        """Unlock the folder (and remove it if this run left nothing in it)."""
        for stage in self.stages.values():
            stage.release()
        self.lock.release()
        remove_empty_folder(self.directory)
        if self.directory != self.folder:
            remove_empty_folder(self.folder)

    @property
    def state_path(self) -> str:
        return os.path.join(self.directory, STATE_NAME)

    # ------------------------------------------------------------------ start
    def begin(self, fingerprints: dict[str, str], num_layers: int) -> dict | None:
        """Validate the folder against this prune; returns the saved state when resuming, else None."""
        self.acquire()
        self._check_processes()
        existing = self._read_state()
        if existing is None:
            if self.resume:
                logger.warning("No checkpoint in %s: starting from the first layer.", self.directory)
            self.state = {"version": CHECKPOINT_VERSION, "fingerprint": fingerprints, "num_layers": num_layers,
                          "next_layer": 0, "layers": [], "inputs": None, "stale": [], "report": None, "seconds": 0.0}
            return None
        self.check_start(existing)
        saved = existing.get("fingerprint", {})
        for key, what in _WHAT.items():
            if saved.get(key) != fingerprints[key]:
                raise PruningError(
                    f"The checkpoint in {self.directory} was written for {what} than this prune; resume with the "
                    f"same model, config and data, or use another checkpoint folder (or delete this one) to start over."
                )
        if existing.get("num_layers") != num_layers:
            raise PruningError(f"The checkpoint in {self.directory} is for a model with {existing.get('num_layers')} "
                               f"layers, this one has {num_layers}; use another checkpoint folder.")
        self.state = existing
        self._remove_stale()
        logger.info("Resuming from %s: %d of %d layers done.", self.directory, existing["next_layer"], num_layers)
        return existing

    def check_start(self, existing: dict | None = None) -> None:
        """Lock the folder; without ``resume``, refuse one that holds a checkpoint; with it, check the
        checkpoint's files (cheap: call it before loading the model)."""
        if existing is None:
            self.acquire()
            existing = self._read_state()
        self._check_processes()
        if existing is not None and not self.resume:
            done = "the whole-model decision made, " if existing.get("decision") else ""
            raise PruningError(
                f"{self.directory} holds a checkpoint of a prune ({done}layer {existing.get('next_layer')} of "
                f"{existing.get('num_layers')} done); pass resume (--resume) to continue it, or choose an empty "
                f"checkpoint folder."
            )

    def _check_processes(self) -> None:
        """Refuse a checkpoint that another number of processes wrote (its inputs are other windows')."""
        if not self.per_process:
            return
        top = os.path.isfile(os.path.join(self.folder, STATE_NAME))
        others = {int(m.group(2)) for name in (os.listdir(self.folder) if os.path.isdir(self.folder) else [])
                  if (m := _PROCESS_FOLDERS.fullmatch(name)) and os.path.isfile(os.path.join(self.folder, name, STATE_NAME))}
        written = sorted(({1} if top else set()) | others)
        if written and written != [world_size()]:
            counts = " and ".join(str(n) for n in written)
            raise PruningError(f"{self.folder} holds a checkpoint written by {counts} process(es); this run has "
                               f"{world_size()}: resume it with {counts} process(es) (torchrun --nproc_per_node), or "
                               f"use another checkpoint folder.")

    def _read_state(self) -> dict | None:
        if not os.path.isfile(self.state_path):
            return None
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PruningError(f"{self.state_path} is unreadable ({err}); delete the checkpoint folder to start over.") from None
        if not isinstance(state, dict) or not isinstance(state.get("version"), int):
            raise PruningError(f"{self.state_path} is not an optimum-prune checkpoint; choose another folder.")
        if state["version"] > CHECKPOINT_VERSION:
            raise PruningError(f"{self.state_path} has checkpoint version {state['version']}; this optimum-prune "
                               f"reads up to {CHECKPOINT_VERSION}: upgrade optimum-prune or start over.")
        listed = _listed_files(state)
        if listed is None:
            raise PruningError(f"{self.state_path} is corrupt: it names files that are not this checkpoint's own; "
                               f"delete the checkpoint folder to start over.")
        for name in listed:
            if name in state.get("stale", []):
                continue
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise PruningError(f"Checkpoint file {name} is missing from {self.directory}; delete the folder to start over.")
            _check_safetensors(path)
        return state

    def _remove_stale(self) -> None:
        """Delete the files the state lists as replaced (a kill can come before `commit` removes them)."""
        for name in self.state.get("stale", []):
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                os.remove(path)

    # ------------------------------------------------------------------ reading
    def layer_changes(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """What layer ``index`` changed, and the RNG state after it."""
        changes = self._load(self.state["layers"][index])
        return changes, changes.pop(_RNG_KEY)

    def decision(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The whole-model decision committed by `commit_decision` (its tensors and notes), with the
        RNG put back to its state after the decision; None when there is none yet."""
        return self._read_whole("decision")

    def search(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The search state last committed by `commit_search` (tensors and notes), with the RNG put
        back to its state then; None when there is none."""
        return self._read_whole("search")

    def _read_whole(self, key: str):
        if not (self.state or {}).get(key):
            return None
        tensors = self._load(self.state[key])
        torch.set_rng_state(tensors.pop(_RNG_KEY))
        logger.info("Resuming from %s: the whole-model %s is taken from the checkpoint.", self.directory, key)
        return tensors, dict(self.state.get(f"{key}_notes") or {})

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = os.path.join(self.directory, name)
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - a damaged file is the user's to delete, in one line
            raise PruningError(f"Checkpoint file {path} is damaged ({first_line(err)}); delete the checkpoint "
                               f"folder to start over.") from None

    def inputs(self):
        """The saved inputs of the next layer, one batch at a time in batch order (None when the
        prune needs no data)."""
        from safetensors import safe_open

        if not self.state.get("inputs"):
            return None

        def batches():
            with safe_open(os.path.join(self.directory, self.state["inputs"]), framework="pt") as handle:
                for i in range(len(list(handle.keys()))):
                    yield handle.get_tensor(str(i))

        return batches()

    # ------------------------------------------------------------------ writing
    def commit(self, index: int, changes: dict[str, torch.Tensor], inputs: list[torch.Tensor] | None,
               report: dict, seconds: float) -> None:
        """Record that layer ``index`` is finished."""
        from safetensors.torch import save_file

        start = time.perf_counter()
        layer_name = f"layer-{index:05d}.safetensors"
        if _RNG_KEY in changes:
            raise ValueError(f"{_RNG_KEY} is reserved")
        tensors = {**{k: _cpu(v) for k, v in changes.items()}, _RNG_KEY: torch.get_rng_state()}
        self._atomic(layer_name, lambda path: save_file(tensors, path))
        old_inputs = self.state.get("inputs")
        inputs_name = None
        if inputs is not None:
            inputs_name = f"inputs-{index + 1:05d}.safetensors"
            self._atomic(inputs_name, lambda path: save_batches(inputs, path))
        self._remove_stale()
        previous = None
        if is_distributed():  # the inputs of the last commit stay until the next (see `rewind`)
            previous = {"inputs": old_inputs, "report": self.state.get("report"), "seconds": self.state.get("seconds", 0.0)}
            old_inputs = (self.state.get("previous") or {}).get("inputs")
        stale = [old_inputs] if old_inputs and old_inputs not in (inputs_name, (previous or {}).get("inputs")) else []
        state = dict(self.state, next_layer=index + 1, layers=self.state["layers"][:index] + [layer_name],
                     inputs=inputs_name, stale=stale, report=report, seconds=seconds, previous=previous)
        self._atomic(STATE_NAME, lambda path: _write_json(state, path))
        self.state = state
        self._remove_stale()
        logger.debug("Checkpointed layer %d in %.2fs", index, time.perf_counter() - start)

    def commit_decision(self, tensors: dict[str, torch.Tensor], notes: dict, seconds: float) -> None:
        """Record a whole-model method's decision (the units it removes, what its report needs) before
        the model is changed: a resume takes it instead of searching again. ``notes``: JSON values."""
        self._commit_whole("decision", DECISION_NAME, tensors, notes, seconds)

    def commit_search(self, tensors: dict[str, torch.Tensor], notes: dict, seconds: float) -> None:
        """Record a whole-model search in progress (replacing the previous one): a resume continues it."""
        self._commit_whole("search", SEARCH_NAME, tensors, notes, seconds)

    def _commit_whole(self, key: str, name: str, tensors: dict[str, torch.Tensor], notes: dict, seconds: float):
        from safetensors.torch import save_file

        if _RNG_KEY in tensors:
            raise ValueError(f"{_RNG_KEY} is reserved")
        saved = {**{k: _cpu(v) for k, v in tensors.items()}, _RNG_KEY: torch.get_rng_state()}
        self._atomic(name, lambda path: save_file(saved, path))
        state = dict(self.state, **{key: name, f"{key}_notes": notes}, seconds=seconds)
        self._atomic(STATE_NAME, lambda path: _write_json(state, path))
        self.state = state

    def stage(self, name: str) -> "LayerCheckpoint":
        """The checkpoint of a later stage of this prune (``finish``: the layer-wise finish after a
        whole-model decision, on the changed model, with its own layers and fingerprint), in a
        subfolder; released and cleared with this one."""
        if name not in STAGES:
            raise ValueError(f"unknown checkpoint stage {name!r}; known: {STAGES}")
        if name not in self.stages:
            self.stages[name] = LayerCheckpoint(os.path.join(self.directory, name), resume=self.resume,
                                                per_process=False)
        return self.stages[name]

    def rewind(self, next_layer: int) -> dict | None:
        """Go back to ``next_layer`` layers done, one before this process's last commit (several
        processes: a kill came between two processes' commits of one layer): its previous inputs,
        report and time. Returns the state (None when that leaves no layer done)."""
        state = self.state
        if state["next_layer"] == next_layer:
            return state
        previous = state.get("previous")
        if state["next_layer"] != next_layer + 1 or previous is None:
            raise PruningError(f"The checkpoints of the processes in {self.folder} disagree ({state['next_layer']} "
                               f"against {next_layer} layers done); delete the folder to start over.")
        rewound = dict(state, next_layer=next_layer, layers=state["layers"][:next_layer], inputs=previous["inputs"],
                       report=previous["report"], seconds=previous["seconds"], previous=None)
        self._atomic(STATE_NAME, lambda path: _write_json(rewound, path))
        for name in set(_listed_files(state) or []) - set(_listed_files(rewound) or []):
            if os.path.isfile(os.path.join(self.directory, name)):
                os.remove(os.path.join(self.directory, name))
        self.state = rewound
        return rewound if next_layer > 0 else None

    def _atomic(self, name: str, write) -> None:
        final = os.path.join(self.directory, name)
        tmp = final + ".tmp"
        try:
            write(tmp)
            os.replace(tmp, final)
        except Exception as err:  # noqa: BLE001 - safetensors wraps the OS error in its own type
            if os.path.exists(tmp):
                os.remove(tmp)
            if not is_disk_full(err):
                raise
            done = self.state.get("next_layer", 0) if self.state else 0
            raise PruningError(f"No space left on the disk of the checkpoint folder {self.directory} while writing "
                               f"{name}; the {done} finished layer(s) committed before are intact: free space there "
                               f"and run again with resume (--resume).") from None

    def clear(self) -> None:
        """Delete the checkpoint's files (after the pruned model was saved): exactly those
        ``checkpoint.json`` lists (and those of its stages), and the folder if that leaves it empty."""
        for name in STAGES:
            if os.path.isdir(os.path.join(self.directory, name)):
                self.stage(name).clear()
        if not os.path.isfile(self.state_path):
            self.release()
            return
        self.acquire()
        try:
            state = self._read_state() if self.state is None else self.state
            for name in _listed_files(state) or []:
                path = os.path.join(self.directory, name)
                if os.path.isfile(path):
                    os.remove(path)
            os.remove(self.state_path)
            self.state = None
        finally:
            self.release()


def _listed_files(state: dict) -> list[str] | None:
    """The files a checkpoint state names; None if one of them is not a name `commit` gives."""
    names = list(state.get("layers") or []) + list(state.get("stale") or [])
    names += [state[key] for key in ("decision", "search") if state.get(key)]
    if state.get("inputs"):
        names.append(state["inputs"])
    if (state.get("previous") or {}).get("inputs"):
        names.append(state["previous"]["inputs"])
    if not all(isinstance(name, str) and _FILE_NAMES.fullmatch(name) for name in names):
        return None
    return names


def _check_safetensors(path: str) -> None:
    """Refuse a damaged checkpoint file (its header is read; cheap) before any work starts."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise PruningError(f"Checkpoint file {path} is damaged ({first_line(err)}); delete the checkpoint folder "
                           f"to start over.") from None



def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _write_json(data: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
