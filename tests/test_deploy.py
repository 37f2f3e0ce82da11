"""Outputs where people serve: the Nemotron-NAS form of heterogeneous Llama-family models (loaded
without optimum-prune), GGUF files run by llama.cpp itself (the xllamacpp wheel), ``serve_with``'s
rules and refusals, and the "Where it runs" table of the model card."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_bpe_tokenizer, tiny_model
from test_structured import load_elsewhere
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, PruningError
from optimum_prune.fields import SERVING_ENGINES
from optimum_prune.export.engines import where_it_runs
from optimum_prune.export.gguf import GGUF_TYPES, export_gguf
from optimum_prune.modeling import DeciLMConfig, DeciLMForCausalLM

llamacpp = pytest.importorskip("optimum_prune.evaluation.llamacpp")
pytest.importorskip("xllamacpp")

FAMILIES = ["llama", "qwen2", "mistral"]
VOCAB = 320  # the BPE tokenizer's 300 tokens, padded
# layer 0 loses more, layer 2's MLP less: every layer its own MLP width; the attention of some
# layer loses a KV group (its query heads with it)
HETERO = {"*.layers.0": {"sparsity": 0.45}, "*.layers.2.mlp": {"sparsity": 0.1}}
PROMPT = "the lazy dog said 12 people jumps over"


def bpe_model(family, seed=0):
    # larger weights than the default: peaked attention, so that a wrong rotation or head order
    # changes the greedy tokens (with near-uniform attention it might not)
    return tiny_model(family, seed=seed, vocab_size=VOCAB, num_hidden_layers=3, bos_token_id=0, eos_token_id=0,
                      initializer_range=0.3)


def calibration():
    return torch.randint(0, 300, (4000,), generator=torch.Generator().manual_seed(0))


def pruned(family, kind, **config):
    model = bpe_model(family, seed=1 if kind == "blocks" else 0)  # seed 0's block model has a near-tie at token 9
    if kind == "dense":
        return model, None
    if kind in ("depth", "blocks"):  # whole layers removed (a stock checkpoint with fewer layers), or blocks
        options = {"granularity": "block", "keep_ends": False} if kind == "blocks" else {}
        pruner = Pruner(PruningConfig(method="block-influence", pattern="structured", sparsity=0.34,
                                      num_calibration_samples=8, seqlen=32, batch_size=4, method_kwargs=options,
                                      **config))
        pruner.prune(model, calibration(), progress=False)
        return model, pruner
    overrides = HETERO if kind == "heterogeneous" else {}
    pruner = Pruner(PruningConfig(method="fasp", pattern="structured", sparsity=0.3, overrides=overrides,
                                  num_calibration_samples=8, seqlen=32, batch_size=4, channel_multiple=1, **config))
    pruner.prune(model, calibration(), progress=False)
    return model, pruner


def greedy(model, ids, tokens=32):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def decided(model, ids, generated, margin=1e-3) -> int:
    """How many of transformers' greedy tokens are decided by more than ``margin`` in its logits:
    past a near-tie two correct engines may part (float summation order), so comparisons stop there."""
    sequence = torch.tensor([ids[0].tolist() + generated])
    with torch.no_grad():
        logits = model(sequence).logits[0, ids.shape[1] - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    ties = ((top2[:, 0] - top2[:, 1]) < margin).nonzero()
    return int(ties[0]) if ties.numel() else len(generated)


def llama_cpp_tokens(path, ids, tokens=32):
    with llamacpp.LlamaCpp(path, context=256, threads=2) as engine:
        return engine.generate(ids[0].tolist(), tokens), engine.tokenize(PROMPT)


# ------------------------------------------------------------------------------------------------ GGUF
@pytest.mark.parametrize("kind", ["dense", "uniform", "heterogeneous", "depth", "blocks"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_generates_what_transformers_generates(family, kind, tmp_path):
    """32 greedy tokens from the f32 GGUF in llama.cpp equal transformers' (and llama.cpp tokenises
    the prompt as transformers does); the q8_0 file loads and generates."""
    tokenizer = make_bpe_tokenizer()
    model, pruner = pruned(family, kind)
    folder = str(tmp_path / "out")
    if pruner is None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    else:
        pruner.save_pretrained(folder, tokenizer=tokenizer)
    config = json.load(open(os.path.join(folder, "config.json")))
    widths = config.get("layer_widths")
    if kind == "heterogeneous":
        assert len({w.get("intermediate_size") for w in widths}) == 3
        assert any("num_key_value_heads" in w for w in widths)  # per-layer KV groups too
    elif kind == "blocks":  # layer 1 without attention (a no_op block, the Nemotron-NAS form), layer 2 removed
        assert config["model_type"] == "nemotron-nas" and config["num_hidden_layers"] == 2
        assert [block["attention"]["no_op"] for block in config["block_configs"]] == [False, True]
        assert pruner.report.removed_blocks == ["model.layers.1.self_attn"] and pruner.report.removed_layers == [2]
    else:
        assert widths is None
    if kind == "depth":
        assert config["num_hidden_layers"] == 2 and model.config.num_hidden_layers == 2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = greedy(model, ids)
    path = export_gguf(folder, dtype="f32")
    generated, prompt_ids = llama_cpp_tokens(path, ids)
    assert prompt_ids == ids[0].tolist()
    upto = decided(model, ids, expected)  # 32 unless a near-tie (checked: only the Llama and Mistral depth models have one, at token 23)
    assert upto >= 16 and generated[:upto] == expected[:upto]
    quantised = export_gguf(folder, dtype="q8_0")
    assert os.path.getsize(quantised) < 0.5 * os.path.getsize(path)
    generated, _ = llama_cpp_tokens(quantised, ids)
    assert len(generated) == 32 and all(0 <= token < VOCAB for token in generated)  # quantised: ids may drift


def test_gguf_types_and_odd_widths(tmp_path):
    """q8_0 quantises the rows that are multiples of 32 long and keeps the others f16; f16 and bf16 write
    2-D weights in that type and norms in f32; the architecture is deci for per-layer widths."""
    import gguf

    tokenizer = make_bpe_tokenizer()
    model, pruner = pruned("llama", "heterogeneous")
    folder = str(tmp_path / "out")
    pruner.save_pretrained(folder, tokenizer=tokenizer)
    for kind in GGUF_TYPES:
        reader = gguf.GGUFReader(export_gguf(folder, dtype=kind))
        assert reader.fields["general.architecture"].contents() == "deci"
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32"
        down = types["blk.0.ffn_down.weight"]  # rows of the layer's MLP width: 41-ish, not a multiple of 32
        assert {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "F16"}[kind] == down
        if kind == "q8_0":
            assert types["blk.0.ffn_up.weight"] == "Q8_0"  # rows of hidden_size 64
    heads = gguf.GGUFReader(os.path.join(folder, "out-f32.gguf")).fields["deci.attention.head_count_kv"].contents()
    assert len(set(heads)) == 2


def test_gguf_refusals_are_one_line(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "qwen3")
    with pytest.raises(PruningError, match="GGUF export covers llama, mistral, qwen2"):
        export_gguf(tmp_path / "qwen3")
    model = bpe_model("llama")
    model.save_pretrained(tmp_path / "wordlevel")
    from conftest import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path / "wordlevel")
    with pytest.raises(PruningError, match="byte-level BPE"):
        export_gguf(tmp_path / "wordlevel")
    assert not [name for name in os.listdir(tmp_path / "wordlevel") if "gguf" in name]  # nothing half-written
    window = tiny_model("mistral", sliding_window=16)
    window.save_pretrained(tmp_path / "window")
    with pytest.raises(PruningError, match="sliding window of 16"):
        export_gguf(tmp_path / "window")


# ------------------------------------------------------------------------------------------------ Nemotron-NAS
@pytest.mark.parametrize("family", FAMILIES)
def test_nemotron_nas_folder_loads_without_optimum_prune(family, tmp_path):
    """A heterogeneous prune for vLLM is saved as DeciLMForCausalLM; a fresh interpreter without
    optimum-prune loads it with trust_remote_code and computes the in-memory model's logits; with
    optimum-prune imported the registered classes load it; llama.cpp runs its GGUF."""
    tokenizer = make_bpe_tokenizer()
    model, pruner = pruned(family, "heterogeneous", serve_with="vllm")
    folder = str(tmp_path / "out")
    pruner.save_pretrained(folder, tokenizer=tokenizer, gguf="f32")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert len({block["ffn"]["intermediate_size"] for block in config["block_configs"]}) == 3
    assert {block["attention"]["n_heads_in_group"] for block in config["block_configs"]} == {2}  # attention whole
    assert config.get("qkv_bias", False) == (family == "qwen2")
    assert sorted(name for name in os.listdir(folder) if name.endswith(".py")) == ["modeling_nemotron_nas.py"]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
    remote = load_elsewhere(folder, {"trust_remote_code": True}, block_plugin=True)
    assert remote["class"] == "DeciLMForCausalLM"
    torch.testing.assert_close(remote["logits"], logits, rtol=0, atol=0)
    assert remote["generated"].tolist() == model.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    local = AutoModelForCausalLM.from_pretrained(folder)
    assert type(local) is DeciLMForCausalLM
    torch.testing.assert_close(local(ids).logits, logits, rtol=0, atol=0)
    generated, _ = llama_cpp_tokens(os.path.join(folder, "out-f32.gguf"), ids)
    assert generated == greedy(model, ids)
    card = open(os.path.join(folder, "README.md")).read()
    assert "| vllm | yes | vllm serve folder --trust-remote-code |" in card
    assert "Nemotron-NAS form" in card


def _no_op_folder(tmp_path):
    """A Llama whose layer 0 attention and layer 2 MLP output projections are zero, and the same
    weights as a Nemotron-NAS model in which those blocks are no_op (absent)."""
    tokenizer = make_bpe_tokenizer()
    dense = bpe_model("llama", seed=3)
    with torch.no_grad():
        dense.model.layers[0].self_attn.o_proj.weight.zero_()
        dense.model.layers[2].mlp.down_proj.weight.zero_()
    data = dense.config.to_dict()
    blocks = [{"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 128}} for _ in range(3)]
    blocks[0]["attention"] = {"no_op": True}
    blocks[2]["ffn"] = {"no_op": True}
    nas = DeciLMForCausalLM(DeciLMConfig.from_dict({**data, "block_configs": blocks})).eval()
    state = {k: v for k, v in dense.state_dict().items()
             if not k.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm",
                                  "model.layers.2.mlp", "model.layers.2.post_attention_layernorm"))}
    assert nas.load_state_dict(state, strict=True)
    folder = str(tmp_path / "nas")
    nas.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return dense, nas, tokenizer, folder


def test_no_op_blocks_equal_zeroed_blocks(tmp_path):
    """no_op attention / MLP blocks (no weights, no norm) compute what the dense layer computes with
    the block's output zeroed, with the KV cache in generate (layer 0 has no attention), after a
    reload, and in llama.cpp's deci graph (a layer with attention but no MLP: the one-channel MLP)."""
    import gguf

    dense, nas, tokenizer, folder = _no_op_folder(tmp_path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(nas(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    expected = greedy(dense, ids)
    assert greedy(nas, ids) == expected
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.model.layers[0].self_attn is None and reloaded.model.layers[2].mlp is None
    assert greedy(reloaded, ids) == expected
    path = export_gguf(folder, dtype="f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["deci.attention.head_count"].contents() == [1, 4, 4]  # the stub head of layer 0
    assert fields["deci.feed_forward_length"].contents() == [128, 128, 1]
    generated, _ = llama_cpp_tokens(path, ids)
    assert generated == expected


def test_nemotron_nas_refusals_keep_the_own_form(tmp_path):
    """Fewer query heads in some layer: no Nemotron-NAS form; the folder keeps optimum-prune's form and
    the card says why and that vLLM cannot serve it."""
    tokenizer = make_bpe_tokenizer()
    model, pruner = pruned("llama", "heterogeneous")
    folder = str(tmp_path / "out")
    pruner.save_pretrained(folder, tokenizer=tokenizer)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "optimum_pruned_llama"
    card = open(os.path.join(folder, "README.md")).read()
    assert "no Nemotron-NAS form, layer" in card and "| vllm | no |" in card


def test_ffn_mult_written_on_the_256_grid():
    from optimum_prune.export.nemotron_nas import ffn_entry
    from optimum_prune.modeling.modeling_nemotron_nas import ffn_mult_to_intermediate_size

    for hidden in (576, 4096, 5120):
        for width in (256, 768, 1280, 14336):
            entry = ffn_entry(width, hidden)
            assert ffn_mult_to_intermediate_size(entry["ffn_mult"], hidden) == width
    assert "ffn_mult" not in ffn_entry(1088, 576)


# ------------------------------------------------------------------------------------------------ serve_with
def test_serve_with_rules():
    per_layer = dict(method="fasp", pattern="structured", sparsity=0.3, overrides={"*.layers.0": {"sparsity": 0.4}})
    for engine in ("sglang", "tensorrt-llm", "mlx"):
        cfg = PruningConfig(**per_layer, serve_with=engine)
        assert cfg.channel_multiple == 256 and "*.self_attn" in cfg.ignore
    cfg = PruningConfig(**per_layer, serve_with="vllm")
    assert cfg.channel_multiple == 32 and "*.self_attn" in cfg.ignore
    cfg = PruningConfig(**per_layer, serve_with="llama.cpp", channel_multiple=1)
    assert cfg.channel_multiple == 32 and cfg.ignore == []  # deci reads per-layer heads
    uniform = PruningConfig(method="fasp", pattern="structured", sparsity=0.3, serve_with="sglang", channel_multiple=1)
    assert uniform.channel_multiple == 1 and uniform.ignore == []  # a stock checkpoint: any width
    assert PruningConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(PruningError, match="serve_with must be one of"):
        PruningConfig(serve_with="ollama")


def test_serve_with_refuses_before_any_work():
    calls = []
    model = tiny_model("qwen3")
    pruner = Pruner(PruningConfig(method="policy_gradient", pattern="structured", sparsity=0.3, serve_with="vllm"))
    pruner.method.optimise = lambda *a: calls.append(a)
    with pytest.raises(PruningError, match="Nemotron-NAS form, which describes llama, mistral, qwen2 layers, not qwen3"):
        pruner.prune(model, calibration())
    pruner = Pruner(PruningConfig(method="fasp", pattern="structured", sparsity=0.3, serve_with="llama.cpp"))
    with pytest.raises(PruningError, match="--serve-with llama.cpp: GGUF export covers"):
        pruner.prune(model, calibration())
    assert not calls


def test_cli_gguf_and_its_refusal(tmp_path):
    base = tmp_path / "base"
    bpe_model("llama").save_pretrained(base)
    make_bpe_tokenizer().save_pretrained(base)
    (tmp_path / "calib.txt").write_text("\n".join(f"the lazy dog {i} jumps" for i in range(300)))
    common = ["--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "16", "--no-progress"]
    run = [sys.executable, "-m", "optimum_prune.commands"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    done = subprocess.run(run + ["--model", str(base), "--method", "wanda", "--output", str(out), "--gguf", "q8_0",
                                 *common], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "out-q8_0.gguf").exists()
    card = (out / "README.md").read_text()
    assert "| llama.cpp | yes | llama-server -m out-q8_0.gguf (no faster than the dense model" in card
    qwen3 = tmp_path / "qwen3"
    tiny_model("qwen3").save_pretrained(qwen3)
    refused = subprocess.run(run + ["--model", str(qwen3), "--method", "wanda", "--output", str(tmp_path / "q"),
                                    "--gguf", "f16", *common], capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "--gguf: GGUF export covers" in refused.stderr
    assert not (tmp_path / "q").exists()


def test_where_it_runs_table():
    stock = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64}
    rows = {engine: (verdict, how) for engine, verdict, how in where_it_runs(stock, "2:4")}
    assert set(rows) == set(SERVING_ENGINES)
    assert "no faster than the dense model" in rows["vllm"][1]
    assert rows["llama.cpp"][0] == "yes"
    qwen3 = {"model_type": "optimum_pruned_qwen3", "layer_widths": [{"intermediate_size": 8}, {}],
             "num_attention_heads": 4}
    rows = {engine: verdict for engine, verdict, _ in where_it_runs(qwen3, "structured")}
    assert rows == {"transformers": "yes", "vllm": "no", "sglang": "no", "tensorrt-llm": "no", "mlx": "no",
                    "llama.cpp": "no"}


def test_deploy_page_lists_every_engine_and_gguf_type():
    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "deploy.md")).read()
    for engine in SERVING_ENGINES:
        assert f"`{engine}`" in page
    for kind in GGUF_TYPES:
        assert f"`{kind}`" in page


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_gguf_rope_scaling(rope, tmp_path):
    """Linear and Llama-3 rope scaling reach llama.cpp (metadata, or the rope_freqs tensor)."""
    tokenizer = make_bpe_tokenizer()
    # peaked attention (larger weights) over a long prompt: the positions' rotation decides the tokens
    model = tiny_model("llama", vocab_size=VOCAB, num_hidden_layers=2, bos_token_id=0, eos_token_id=0,
                       initializer_range=0.3, rope_parameters={"rope_theta": 10000.0, **rope})
    folder = str(tmp_path / "rope")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = tokenizer(" ".join([PROMPT] * 12), return_tensors="pt").input_ids
    generated, _ = llama_cpp_tokens(export_gguf(folder, dtype="f32"), ids)
    assert generated == greedy(model, ids)
