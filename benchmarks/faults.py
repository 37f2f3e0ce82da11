"""Faults and bad inputs, tried one by one on a tiny random LLaMA; prints what each one gets.

Every row is produced by actually provoking the fault (the error text is the first line of what
the user sees); the table in docs/reliability.md is this script's output.

    python benchmarks/faults.py > /tmp/faults.md
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
import transformers

from optimum_prune import Pruner, PruningConfig
from optimum_prune.calibration import resources
from optimum_prune.calibration.checkpoint import STATE_NAME
from optimum_prune.calibration.statistics import InputStatistics
from optimum_prune.methods.masks import Target
from optimum_prune.pruner import load_model, save_pruned
from optimum_prune.registry import get_method


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
ROWS: list[tuple[str, str]] = []


def tiny(layers=4, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **overrides)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


IDS = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))


def config(**kw):
    return PruningConfig(**{"method": "sparsegpt", "sparsity": 0.5, "num_calibration_samples": 8, "seqlen": 32, **kw})


def outcome(fn) -> str:
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - we report whatever happens
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {text}"
    return result if isinstance(result, str) else "runs"


def row(fault: str, fn) -> None:
    text = outcome(fn).replace("|", "\\|")
    ROWS.append((fault, text))
    print(f"- {fault}: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
def config_faults():
    row("unknown method", lambda: config(method="sparsgpt"))
    row("sparsity out of range (1.2)", lambda: config(sparsity=1.2))
    row("N:M with N >= M (4:2)", lambda: config(pattern="4:2", sparsity=None))
    row("unknown method option", lambda: config(method_kwargs={"blocksiz": 64}))
    row("pattern the method cannot do (sparsegpt, structured)", lambda: config(pattern="structured"))
    row("invalid regex in targets", lambda: config(targets=["re:("]))
    row("pruning_config.json from a newer optimum-prune",
        lambda: PruningConfig.from_dict({"method": "wanda", "format_version": 99, "optimum_prune_version": "9.0"}))
    row("unknown field in pruning_config.json", lambda: PruningConfig.from_dict({"method": "wanda", "sparsty": 0.5}))

    def not_json():
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            handle.write("{oops")
        return PruningConfig.from_json_file(handle.name)

    row("pruning_config.json that is not JSON", not_json)


def model_faults():
    def tampered(change):
        folder = tempfile.mkdtemp()
        tiny(2).save_pretrained(folder)
        change(folder)
        load_model(folder)

    def edit(folder, old, new):
        path = os.path.join(folder, "config.json")
        with open(path) as handle:
            text = handle.read()
        with open(path, "w") as handle:
            handle.write(text.replace(old, new))

    def truncate(folder):
        path = os.path.join(folder, "model.safetensors")
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[:5000])

    row("model folder: config.json hidden_size tampered", lambda: tampered(lambda f: edit(f, '"hidden_size": 64', '"hidden_size": 96')))
    row("model folder: config.json not JSON", lambda: tampered(lambda f: edit(f, "{", "{{")))
    row("model folder: weights truncated", lambda: tampered(truncate))
    row("model folder: does not exist", lambda: load_model("/nonexistent/model"))
    row("N:M on a width not divisible by M (2:7 on 64 inputs)", lambda: Pruner(config(pattern="3:7", sparsity=None)).prune(tiny(2), IDS, progress=False))
    row("empty calibration data", lambda: Pruner(config()).prune(tiny(2), IDS[:0], progress=False))
    row("calibration text that tokenizes to nothing", lambda: Pruner(config()).prune(tiny(2), ["   "], tokenizer=_tokenizer(), progress=False))

    def encoder():
        model = transformers.AutoModel.from_config(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                                           num_attention_heads=2, intermediate_size=64))
        Pruner(config(method="wanda-sp", pattern="structured", sparsity=0.2)).prune(model, IDS, progress=False)

    row("structured pruning of an architecture without a channel layout (BERT)", encoder)

    def nan_activations():
        model = tiny(2)
        with torch.no_grad():
            model.model.layers[0].post_attention_layernorm.weight[0] = float("nan")
        Pruner(config()).prune(model, IDS, progress=False)

    row("NaN in the activations", nan_activations)

    def half(dtype):
        model = tiny(2).to(dtype)
        Pruner(config()).prune(model, IDS, progress=False)
        finite = all(torch.isfinite(p.float()).all() for p in model.parameters())
        return f"runs; weights finite: {finite}, statistics accumulated in float32"

    row("float16 model", lambda: half(torch.float16))
    row("bfloat16 model", lambda: half(torch.bfloat16))


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def numeric_faults():
    def solve(method, X, dampening):
        stats = InputStatistics(X.shape[1], get_method(method).statistics | {"sq_norm"})
        stats.update(X)
        W = torch.randn(16, X.shape[1], generator=torch.Generator().manual_seed(1))
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("optimum_prune").addHandler(handler)
        logging.getLogger("optimum_prune").setLevel(logging.WARNING)
        try:
            (result,) = get_method(method)(dampening=dampening).prune_linears([W], stats, Target(0.5, config().parsed_pattern))
        finally:
            logging.getLogger("optimum_prune").removeHandler(handler)
        warned = f"; warning: {records[0].getMessage()}" if records else ""
        return f"finite weights: {bool(torch.isfinite(result.weight).all())}{warned}"

    g = torch.Generator().manual_seed(0)
    dead = torch.randn(200, 32, generator=g)
    dead[:, ::4] = 0
    for method in ("sparsegpt", "alps", "fista", "sparsefw"):
        row(f"{method}: Gram matrix with zero rows (dead input channels)", lambda m=method: solve(m, dead, 0.01))
        row(f"{method}: rank-5 Gram matrix of 32 inputs, dampening 0", lambda m=method: solve(m, torch.randn(5, 32, generator=g), 0.0))


def output_faults():
    root = tempfile.mkdtemp()

    def failing_save():
        model = tiny(2)
        model.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(OSError("No space left on device"))
        try:
            save_pruned(model, os.path.join(root, "out"), config())
        except OSError as err:
            return f"OSError raised ({err}); folder contents afterwards: {sorted(os.listdir(root))}"

    row("disk full while saving", failing_save)

    def stray():
        os.makedirs(os.path.join(root, ".out2.tmp-x1y2"))
        save_pruned(tiny(2), os.path.join(root, "out2"), config())
        return f"stray folder removed (warning logged); folder contents: {sorted(os.listdir(root))}"

    row("temporary folder left by a save killed half-way", stray)
    row("output folder exists and is not empty", lambda: save_pruned(tiny(2), os.path.join(root, "out2"), config()))

    def memory():
        original = resources.available_bytes
        resources.available_bytes = lambda device: 4 * 1024**2
        try:
            Pruner(config(method="alps", num_calibration_samples=64, seqlen=128)).prune(tiny(2), IDS.repeat(3), progress=False)
        finally:
            resources.available_bytes = original

    row("not enough memory for one layer (4 MiB free)", memory)


def checkpoint_faults():
    root = tempfile.mkdtemp()
    ckpt = os.path.join(root, "ckpt")
    from optimum_prune.calibration import engine as engine_module

    original = engine_module.LayerwiseEngine._prune_layer

    def stop(self, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return original(self, index, *args)

    engine_module.LayerwiseEngine._prune_layer = stop
    try:
        Pruner(config()).prune(tiny(), IDS, progress=False, checkpoint_dir=ckpt)
    except KeyboardInterrupt:
        pass
    finally:
        engine_module.LayerwiseEngine._prune_layer = original
    row("checkpoint folder in use, no --resume", lambda: Pruner(config()).prune(tiny(), IDS, progress=False, checkpoint_dir=ckpt))
    row("resume with another config", lambda: Pruner(config(sparsity=0.6)).prune(tiny(), IDS, progress=False, checkpoint_dir=ckpt, resume=True))
    row("resume with another model", lambda: Pruner(config()).prune(tiny(seed=1), IDS, progress=False, checkpoint_dir=ckpt, resume=True))
    row("resume with other calibration data", lambda: Pruner(config()).prune(tiny(), IDS.flip(0), progress=False, checkpoint_dir=ckpt, resume=True))

    def resumed():
        reference = tiny()
        Pruner(config()).prune(reference, IDS, progress=False)
        model = tiny()
        Pruner(config()).prune(model, IDS, progress=False, checkpoint_dir=ckpt, resume=True)
        same = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
        return f"resumed at layer 2 of 4; weights bit-identical to an uninterrupted run: {same}"

    row("exception (KeyboardInterrupt) at layer 2 of 4, then resume", resumed)
    with open(os.path.join(ckpt, STATE_NAME), "w") as handle:
        handle.write("{half")
    row("checkpoint.json corrupted", lambda: Pruner(config()).prune(tiny(), IDS, progress=False, checkpoint_dir=ckpt, resume=True))


def signal_faults():
    root = tempfile.mkdtemp()
    folder = os.path.join(root, "model")
    tiny().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    calib = os.path.join(root, "calib.txt")
    with open(calib, "w") as handle:
        handle.write(" ".join(["a"] * 2000))
    slow = ("import sys, time\nimport optimum_prune.methods.sparsegpt as s\nf = s.SparseGPT.solve\n"
            "s.SparseGPT.solve = lambda *a, **k: (time.sleep(0.4), f(*a, **k))[1]\n"
            "from optimum_prune.commands.prune import main\nsys.exit(main(sys.argv[1:]))\n")

    def args(name, *extra):
        return ["--model", folder, "--dataset", calib, "--num-samples", "8", "--seqlen", "32", "--no-progress",
                "--output", os.path.join(root, name), "--checkpoint-dir", os.path.join(root, name + "-ckpt"), *extra]

    def interrupt(sig, name):
        out = os.path.join(root, name)
        proc = subprocess.Popen([sys.executable, "-c", slow, *args(name)], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        state = os.path.join(root, name + "-ckpt", STATE_NAME)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (os.path.isfile(state) and json.load(open(state))["next_layer"] >= 2):
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        done = json.load(open(state))["next_layer"]
        return (f"exit {proc.returncode}{'; ' + last if sig == signal.SIGINT else ''}; output folder exists: "
                f"{os.path.exists(out)}; checkpoint holds {done} of 4 layers")

    row("Ctrl-C (SIGINT) during the prune", lambda: interrupt(signal.SIGINT, "int"))

    def kill_and_resume():
        first = interrupt(signal.SIGKILL, "kill")
        resumed = subprocess.run([sys.executable, "-m", "optimum_prune.commands", *args("kill", "--resume")],
                                 env=ENV, capture_output=True, text=True, timeout=300)
        return (f"{first}; then `--resume`: exit {resumed.returncode}, output saved: {os.path.isdir(os.path.join(root, 'kill'))}, "
                f"checkpoint deleted: {not os.path.exists(os.path.join(root, 'kill-ckpt'))}")

    row("SIGKILL during the prune, then --resume", kill_and_resume)


def main():
    logging.basicConfig(level=logging.ERROR)
    for group in (config_faults, model_faults, numeric_faults, output_faults, checkpoint_faults, signal_faults):
        group()
    print("| fault or bad input | what happens |")
    print("|---|---|")
    for fault, text in ROWS:
        print(f"| {fault} | {text} |")


if __name__ == "__main__":
    main()
