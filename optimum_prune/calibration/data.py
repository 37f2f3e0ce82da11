"""Calibration data: from whatever the user has to ``n`` token windows of ``seqlen`` tokens.

Accepted sources: a list of strings; a ``datasets.Dataset`` (a text column, or ``input_ids``); a
1-D tensor of token ids (a stream) or a 2-D one (windows, used as they are); a local ``.txt`` / ``.json`` / ``.jsonl`` file (read through ``datasets``);
``packaged:wiki-leads``; or a dataset name on the hub (with config and split).
The texts are joined with a blank line, tokenized once without special tokens, and ``n`` windows
start at positions drawn with a seeded generator.

Conversations (chat data: a ``messages`` column of ``[{"role": ..., "content": ...}, ...]`` lists,
in a Dataset, a JSON/JSONL file or a Python list) are rendered one by one with the tokenizer's chat
template (``apply_chat_template``) and tokenized with the template's special tokens; their token
sequences are packed one after the other, and every window *starts at the start of a
conversation*, so no window begins inside a template (a window may end inside the last
conversation it reaches, as a truncating trainer would cut it). ``calibration_format`` chooses:
``auto`` (conversations when the ``messages_column`` is there, plain text otherwise), ``chat``
(conversations required) or ``text`` (the text column, never rendered).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..assets import PACKAGED_PREFIX, packaged_texts
from ..fields import CALIBRATION_FORMATS
from ..errors import PruningError, first_line
from ..paths import looks_local


logger = logging.getLogger(__name__)

_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json"}
_CHUNK_CHARS, _CHUNK_DOCS = 1_000_000, 256  # tokenize longer text in groups of documents (memory)
_MAX_CHARS = 20_000_000  # enough text for thousands of 2048-token windows; bounds tokenizing time
_MAX_NAME_CHARS = 200  # a Hub dataset name ("org/name") is far shorter


class Conversations(list):
    """Calibration conversations, each a list of ``{"role": ..., "content": ...}`` messages."""


def _is_conversation(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _texts_from_dataset(dataset, text_column: str, messages_column: str = "messages",
                        calibration_format: str = "auto") -> list[str] | torch.Tensor | Conversations:
    columns = list(getattr(dataset, "column_names", []) or [])
    if calibration_format != "text" and messages_column in columns:
        return Conversations(c for c in dataset[messages_column] if _is_conversation(c))
    if calibration_format == "chat":
        raise PruningError(
            f"calibration_format='chat' needs a column {messages_column!r} of conversations (columns: "
            f"{', '.join(columns) or 'none'}); set messages_column / --messages-column to the one holding them."
        )
    if "input_ids" in columns and text_column not in columns:
        ids = [torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in dataset["input_ids"]]
        return torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)
    if text_column not in columns:
        raise PruningError(
            f"The calibration dataset has no column {text_column!r} (columns: {', '.join(columns) or 'none'}); "
            f"set text_column / --text-column to the one holding the text."
        )
    return [t for t in dataset[text_column] if isinstance(t, str)]


def load_calibration_source(
    data: Any, *, dataset_config: str | None = None, split: str = "train", text_column: str = "text",
    messages_column: str = "messages", calibration_format: str = "auto", what: str = "The calibration data",
) -> list[str] | torch.Tensor | Conversations:
    """Texts, conversations, or a 1-D tensor of token ids, from any accepted source. ``what`` names
    the data in messages (the evaluation reads its text through here too)."""
    if calibration_format not in CALIBRATION_FORMATS:
        raise PruningError(f"calibration_format must be one of {', '.join(CALIBRATION_FORMATS)}, got "
                           f"{calibration_format!r}.")
    columns = dict(text_column=text_column, messages_column=messages_column, calibration_format=calibration_format)
    if data is None:
        raise PruningError("No calibration data: pass calibration_data (texts, a Dataset, a file or a dataset name).")
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).long()
    if isinstance(data, (list, tuple)):
        return _from_list(data, messages_column, calibration_format)
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        if data.startswith(PACKAGED_PREFIX):
            return packaged_texts(data)
        return _from_name(data, dataset_config, split, columns, what)
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            return _texts_from_dataset(data, **columns)
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        pass
    raise PruningError(f"Unsupported calibration data of type {type(data).__name__}.")


def _from_list(data, messages_column: str, calibration_format: str) -> list[str] | Conversations:
    """Texts or conversations from a list (of texts, conversations, or records holding one)."""
    if calibration_format != "text" and data and all(_is_conversation(c) for c in data):
        return Conversations(data)
    if calibration_format != "text" and data and all(isinstance(r, dict) and _is_conversation(r.get(messages_column))
                                                     for r in data):
        return Conversations(r[messages_column] for r in data)
    if calibration_format == "chat":
        raise PruningError(f"calibration_format='chat' needs conversations: lists of {{'role', 'content'}} "
                           f"messages, or records with a {messages_column!r} entry holding one.")
    if not all(isinstance(t, str) for t in data):
        raise PruningError("A calibration list must contain strings (texts) or conversations (lists of "
                           "{'role', 'content'} messages).")
    return list(data)


def _from_name(data: str, dataset_config, split: str, columns: dict, what: str) -> list[str] | Conversations:
    """Texts or conversations from a local .txt/.json/.jsonl file or a dataset name."""
    import datasets

    ext = os.path.splitext(data)[1].lower()
    if os.path.isfile(data):
        if ext not in _LOCAL_BUILDERS:
            raise PruningError(f"{what} file {data} must be .txt, .json or .jsonl.")
        if os.path.getsize(data) == 0:
            raise PruningError(f"{what} is empty: {data} has no content.")
        try:
            if ext == ".txt":
                dataset = datasets.load_dataset("text", data_files=data, split="train", sample_by="paragraph")
            else:
                dataset = datasets.load_dataset("json", data_files=data, split="train")
        except Exception as err:  # malformed file: one line naming it
            raise PruningError(f"Could not read calibration file {data}: {first_line(err)}.") from None
        return _texts_from_dataset(dataset, **columns)
    if os.path.exists(data) or ext in _LOCAL_BUILDERS or looks_local(data):
        raise PruningError(f"{what} {_quoted(data)} is not a readable .txt/.json/.jsonl file.")
    if len(data) > _MAX_NAME_CHARS or any(c.isspace() for c in data):  # no dataset name has spaces
        raise PruningError(f"{what} {_quoted(data)} is a string but neither a file nor a dataset name; texts go "
                           f"in a list (calibration_data=[text, ...]), files and dataset names as a string.")
    try:
        dataset = datasets.load_dataset(data, dataset_config, split=split)
    except Exception as err:  # hub or network errors: one line naming the fix
        raise PruningError(
            f"Could not load calibration dataset {data!r} (config={dataset_config!r}, split={split!r}): "
            f"{first_line(err)}. "
            f"Pass a local .txt/.json/.jsonl file or a list of texts instead."
        ) from None
    return _texts_from_dataset(dataset, **columns)


def _quoted(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message, shortened to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def tokenize_joined(texts: list[str], tokenizer, max_chars: int | None = _MAX_CHARS) -> torch.Tensor:
    """Join texts with a blank line and tokenize once (no special tokens) into a 1-D id tensor."""
    joined, size = [], 0
    for text in texts:
        joined.append(text)
        size += len(text) + 2
        if max_chars is not None and size >= max_chars:
            break
    if not any(text.strip() for text in joined):
        return torch.empty(0, dtype=torch.long)
    if size <= _CHUNK_CHARS:
        return torch.tensor(tokenizer("\n\n".join(joined), add_special_tokens=False)["input_ids"], dtype=torch.long)
    # Long text: tokenize groups of documents, each later group starting with the blank line that
    # joins it to the previous one. A fast tokenizer's encoding of one multi-megabyte string holds
    # offsets and token strings for every token (~600 MB for 4 MB of text); the chunks give the same
    # ids for byte-level BPE tokenizers (the split falls before whitespace, which pre-tokenization
    # never merges with the preceding text), at a fraction of the peak memory.
    pieces = []
    for start in range(0, len(joined), _CHUNK_DOCS):
        part = "\n\n".join(joined[start:start + _CHUNK_DOCS])
        ids = tokenizer(part if start == 0 else "\n\n" + part, add_special_tokens=False,
                        return_attention_mask=False)["input_ids"]
        pieces.append(torch.tensor(ids, dtype=torch.long))
    return torch.cat(pieces)


def render_conversations(conversations: Conversations, tokenizer, max_chars: int | None = _MAX_CHARS):
    """Each conversation rendered with the tokenizer's chat template and tokenized (its special
    tokens parsed, none added): the packed 1-D ids and the position where each conversation starts."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise PruningError("The calibration data is conversations, but this model's tokenizer has no chat template; "
                           "calibrate on plain text (calibration_format='text' / --calibration-format text, with "
                           "text_column), or give a tokenizer that has one.")
    pieces, starts, offset, size = [], [], 0, 0
    for messages in conversations:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if not ids:
            continue
        starts.append(offset)
        pieces.append(torch.tensor(ids, dtype=torch.long))
        offset += len(ids)
        size += len(text)
        if max_chars is not None and size >= max_chars:
            break
    if not pieces:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(pieces), torch.tensor(starts, dtype=torch.long)


_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(model_config) -> int | None:
    """The longest sequence a model's config declares (``max_position_embeddings`` or its
    equivalent in the family), or None when it declares none."""
    if model_config is None:
        return None
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    for field in _POSITION_FIELDS:
        value = getattr(model_config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seqlen(model_config, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (learned position tables index past their
    end; rotary models run, but outside the lengths they were trained on)."""
    limit = max_positions(model_config)
    if limit is not None and seqlen > limit:
        raise PruningError(f"seqlen {seqlen} is longer than this model's {limit} positions (max_position_embeddings); "
                           f"pass seqlen (--seqlen) {limit} or less.")


def calibration_windows(
    data: Any,
    tokenizer,
    num_samples: int,
    seqlen: int,
    seed: int = 0,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    messages_column: str = "messages",
    calibration_format: str = "auto",
) -> torch.Tensor:
    """``num_samples`` x ``seqlen`` token windows at seeded random positions of the joined data
    (conversations: at seeded random conversation starts of the packed conversations).

    A 2-D tensor of token ids is taken as ready-made windows and returned unchanged.
    """
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        if data.shape[1] != seqlen or data.shape[0] == 0:
            raise PruningError(
                f"Calibration windows of shape {tuple(data.shape)} do not match seqlen={seqlen}; "
                f"pass (n, {seqlen}) token ids or a 1-D token stream."
            )
        return data.long()
    source = load_calibration_source(data, dataset_config=dataset_config, split=split, text_column=text_column,
                                     messages_column=messages_column, calibration_format=calibration_format)
    allowed = None  # positions a window may start at (conversation starts), or any
    if isinstance(source, torch.Tensor):
        ids = source
    elif isinstance(source, Conversations):
        if tokenizer is None:
            raise PruningError("Calibration conversations need a tokenizer with a chat template; pass tokenizer=....")
        ids, allowed = render_conversations(source, tokenizer)
    else:
        if tokenizer is None:
            raise PruningError("Calibration texts need a tokenizer; pass tokenizer=... or token ids.")
        ids = tokenize_joined(source, tokenizer)
    if ids.numel() == 0:
        raise PruningError("The calibration data is empty; give texts with content.")
    if ids.numel() < seqlen:
        raise PruningError(
            f"The calibration data has {ids.numel()} tokens, fewer than seqlen={seqlen}; give more text or lower seqlen."
        )
    _warn_overlap(ids.numel(), num_samples, seqlen, None if allowed is None else allowed.numel())
    generator = torch.Generator().manual_seed(seed)
    if allowed is not None:
        allowed = allowed[allowed <= ids.numel() - seqlen]
        starts = allowed[torch.randint(0, allowed.numel(), (num_samples,), generator=generator)]
    else:
        starts = torch.randint(0, ids.numel() - seqlen + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _warn_overlap(tokens: int, num_samples: int, seqlen: int, starts: int | None) -> None:
    """A warning when the data cannot give ``num_samples`` distinct windows: more window tokens than
    the data holds (windows overlap), or more windows than conversations to start them at."""
    if starts is not None and num_samples > starts:
        logger.warning("The calibration data holds %d conversations for %d windows: windows repeat; give more "
                       "conversations or fewer samples (num_calibration_samples / --num-samples).", starts, num_samples)
    elif num_samples * seqlen > tokens:
        logger.warning("The calibration data holds %d tokens, fewer than the %d x %d the windows take: they overlap "
                       "(each token is in about %.1f windows); give more text or fewer samples "
                       "(num_calibration_samples / --num-samples).", tokens, num_samples, seqlen,
                       num_samples * seqlen / tokens)
