"""Tiny random models and a tiny word-level tokenizer, built in code: no hub access."""

from __future__ import annotations

import os


# Tests never reach a hub: set before transformers/datasets read their configuration.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402


VOCAB = 256
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    if arch == "opt":
        kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                  word_embed_proj_dim=64, max_position_embeddings=256, enable_bias=True)
        kw.update(overrides)
        return transformers.OPTConfig(**kw)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    kw = dict(common, intermediate_size=128, num_key_value_heads=2)
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "opt"]


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def text_windows(count: int, seed: int) -> torch.Tensor:
    """``count`` windows of 32 token ids of the word texts (structured enough for training to help)."""
    ids = make_tokenizer()(" ".join(make_texts(60, seed=seed)), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: count * 32]).reshape(count, 32)
    assert int(ids.max()) < VOCAB
    return ids


BPE_TEXTS = [f"the quick brown fox jumps over the lazy dog {i} times, said {i % 13} people." for i in range(200)]


def make_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2 style) trained in code on a few sentences: what llama.cpp's
    GGUF tokenizer needs; ``vocab_size`` tokens, ``<|endoftext|>`` = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(BPE_TEXTS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")


def make_texts(count: int = 40, words: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # a little structure (repeated phrases) so that a model could in principle learn something
    return [" ".join(rng.choice(WORDS[: 50 + (i % 5) * 40]) for _ in range(words)) for i in range(count)]


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def texts():
    return make_texts()


@pytest.fixture
def calib_ids():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (4000,), generator=generator)


def synthetic_structured_problem(seed=0, units=48, out=24, inputs=32, tokens=400, cols_per_unit=1):
    """A consumer whose input channels are correlated and unevenly scaled, and the inputs ``Z``."""
    from optimum_prune.calibration.statistics import InputStatistics
    from optimum_prune.methods.structured import StructuredProblem

    g = torch.Generator().manual_seed(seed)
    n = units * cols_per_unit
    mix = torch.randn(n, n, generator=g) / n**0.5
    Z = (torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 2 * mix)) * torch.rand(n, generator=g) * 2
    stats = InputStatistics(n, {"gram", "sq_norm"})
    stats.update(Z)
    producer = torch.randn(units, inputs, generator=g)
    consumer = torch.randn(out, n, generator=g)
    problem = StructuredProblem("mlp", units, [producer], [1], consumer, cols_per_unit, consumer_stats=stats)
    return problem, Z


# ``optimum-prune`` run as ``python -c SLOW_CLI ARGS``, its SparseGPT solves slowed down: a run that
# lasts long enough to be signalled or raced (a few seconds on a tiny model)
SLOW_CLI = """
import sys, time
import optimum_prune.methods.sparsegpt as sparsegpt
solve = sparsegpt.SparseGPT.solve
def slow(*args, **kwargs):
    time.sleep(0.4)
    return solve(*args, **kwargs)
sparsegpt.SparseGPT.solve = slow
from optimum_prune.commands.prune import main
sys.exit(main(sys.argv[1:]))
"""


def python_stdout(code: str, timeout: int = 240) -> str:
    """Run ``code`` in a fresh interpreter (offline); its stdout, or a failure with its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def prune_interrupted(cfg, model, calib_ids, at_layer, **prune_kwargs):
    """``Pruner(cfg).prune(model, ...)`` that is interrupted (KeyboardInterrupt) when layer ``at_layer`` starts."""
    from optimum_prune import Pruner
    from optimum_prune.engine import layerwise as engine_module

    original = engine_module.LayerwiseEngine._prune_layer

    def stop(self, index, *args):
        if index == at_layer:
            raise KeyboardInterrupt
        return original(self, index, *args)

    engine_module.LayerwiseEngine._prune_layer = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            Pruner(cfg).prune(model, calib_ids, progress=False, **prune_kwargs)
    finally:
        engine_module.LayerwiseEngine._prune_layer = original
