"""Calibration on chat data: conversations (a ``messages`` column, a JSON/JSONL file, or a Python
list) are rendered with the tokenizer's chat template; windows start at conversation starts, so they
hold the template's role markers and never begin inside one; a tokenizer without a template is
refused in one line; ``calibration_format`` falls back to plain text or requires conversations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_texts, make_tokenizer, tiny_model

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.calibration.data import Conversations, calibration_windows, load_calibration_source

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"


def chat_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def conversations(count=30):
    texts = make_texts(2 * count, words=25)
    return [[{"role": "user", "content": texts[2 * i]}, {"role": "assistant", "content": texts[2 * i + 1]}]
            for i in range(count)]


def test_windows_start_at_a_conversation_and_hold_the_role_markers(tmp_path):
    tokenizer = chat_tokenizer()
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c, "id": i}) for i, c in enumerate(conversations())))
    assert isinstance(load_calibration_source(str(path)), Conversations)
    windows = calibration_windows(str(path), tokenizer, 12, 40, seed=0)
    assert windows.shape == (12, 40)
    assert bool((windows[:, 0] == user).all())  # every window opens a conversation
    assert all(user in row.tolist() and assistant in row.tolist() for row in windows)
    rendered = tokenizer.apply_chat_template(conversations()[0], tokenize=False)
    assert rendered.startswith("<|user|> ")
    # the same conversations as a Python list, and as records, give the same windows
    assert torch.equal(calibration_windows(conversations(), tokenizer, 12, 40, seed=0), windows)
    records = [{"messages": c} for c in conversations()]
    assert torch.equal(calibration_windows(records, tokenizer, 12, 40, seed=0), windows)


def test_formats_and_the_refusals(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": c, "text": " ".join(m["content"] for m in c)} for c in conversations()]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    plain = make_tokenizer()  # no chat template
    with pytest.raises(PruningError, match="has no chat template.*calibration-format text"):
        calibration_windows(str(path), plain, 4, 32)
    text = calibration_windows(str(path), plain, 4, 32, calibration_format="text")
    assert text.shape == (4, 32)
    with pytest.raises(PruningError, match="needs a column 'dialogue'"):
        calibration_windows(str(path), chat_tokenizer(), 4, 32, messages_column="dialogue", calibration_format="chat")
    with pytest.raises(PruningError, match="calibration_format must be one of auto, chat, text"):
        PruningConfig(calibration_format="messages")


def test_a_model_calibrates_on_chat_data_from_the_cli(tmp_path, capsys):
    from optimum_prune.commands.prune import main

    tokenizer = chat_tokenizer()
    model = tiny_model("llama", vocab_size=264)  # room for the two role markers
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([{"conversation": c} for c in conversations()]))
    code = main(["--model", str(tmp_path / "model"), "--method", "wanda", "--dataset", str(path),
                 "--messages-column", "conversation", "--calibration-format", "chat", "--num-samples", "4",
                 "--seqlen", "32", "--no-progress", "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    saved = PruningConfig.from_pretrained(tmp_path / "out")
    assert (saved.messages_column, saved.calibration_format) == ("conversation", "chat")


def test_pruner_calibrates_on_conversations():
    pruner = Pruner(PruningConfig(method="sparsegpt", num_calibration_samples=4, seqlen=32))
    pruner.prune(tiny_model("llama", vocab_size=264), conversations(), tokenizer=chat_tokenizer(), progress=False)
    assert pruner.report.overall_sparsity == pytest.approx(0.5, abs=0.01)
