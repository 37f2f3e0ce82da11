"""Faults and bad inputs, tried one by one on a tiny random LLaMA; prints what each one gets.

Every row is produced by actually provoking the fault (the error text is the first line of what
the user sees); the table in docs/reliability.md is this script's output.

    python benchmarks/faults.py > /tmp/faults.md
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch
import transformers

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine import resources
from optimum_prune.engine.checkpoint import STATE_NAME
from optimum_prune.calibration.statistics import InputStatistics
from optimum_prune.patterns import Target
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
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/[^/\s;:)]+", "<tmp>", outcome(fn)).replace("|", "\\|")
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
        from optimum_prune.locks import describe_process

        stray = os.path.join(root, ".out2.tmp-x1y2")
        os.makedirs(stray)
        with open(os.path.join(root, ".out2.lock"), "w") as handle:  # what the killed save's lock file noted
            json.dump({**describe_process(), "made": [stray]}, handle)
        save_pruned(tiny(2), os.path.join(root, "out2"), config())
        return f"stray folder removed (warning logged); folder contents: {sorted(os.listdir(root))}"

    row("temporary folder left by a save killed half-way (noted in its lock file)", stray)
    row("output folder exists and is not empty", lambda: save_pruned(tiny(2), os.path.join(root, "out2"), config()))

    def memory():
        original = resources.available_bytes
        resources.available_bytes = lambda device: 4 * 1024**2
        try:
            Pruner(config(method="alps", num_calibration_samples=64, seqlen=128)).prune(tiny(2), IDS.repeat(3), progress=False)
        finally:
            resources.available_bytes = original

    row("not enough memory for one layer (4 MiB free)", memory)


def interrupted_checkpoint(folder: str) -> None:
    """A checkpoint of a prune interrupted (KeyboardInterrupt) when layer 2 of 4 starts."""
    from optimum_prune.engine import layerwise as engine_module

    original = engine_module.LayerwiseEngine._prune_layer

    def stop(self, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return original(self, index, *args)

    engine_module.LayerwiseEngine._prune_layer = stop
    try:
        Pruner(config()).prune(tiny(), IDS, progress=False, checkpoint_dir=folder)
    except KeyboardInterrupt:
        pass
    finally:
        engine_module.LayerwiseEngine._prune_layer = original


def checkpoint_faults():
    root = tempfile.mkdtemp()
    ckpt = os.path.join(root, "ckpt")
    interrupted_checkpoint(ckpt)
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


def cli(*argv) -> str:
    """``optimum-cli prune`` in this process: its exit code and the last line it printed (stderr on
    failure, stdout on success)."""
    import contextlib
    import io

    from optimum_prune.commands.prune import main as prune_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = prune_main([str(a) for a in argv])
    lines = (err if code else out).getvalue().strip().splitlines()
    return f"exit {code}; {lines[-1] if lines else ''}"


def holder(code: str) -> subprocess.Popen:
    """Another process that runs ``code`` (which takes a lock), prints 'held' and waits."""
    proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('held', flush=True)\nimport time; time.sleep(600)"],
                            env=ENV, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def cli_workspace() -> tuple[str, str, str]:
    """A temporary folder with a tiny model (and tokenizer) and a calibration text: (root, model, text)."""
    root = tempfile.mkdtemp()
    model_dir, calib = os.path.join(root, "model"), os.path.join(root, "calib.txt")
    tiny().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    with open(calib, "w") as handle:
        handle.write(" ".join(["a"] * 2000))
    return root, model_dir, calib


def cli_args(model: str, calib: str, output: str, *extra, method: str = "sparsegpt") -> list[str]:
    """The flags of a small CLI prune of ``model`` on ``calib`` into ``output``."""
    return ["--model", model, "--method", method, "--sparsity", "0.5", "--dataset", calib, "--num-samples", "4",
            "--seqlen", "32", "--no-progress", "--output", output, *extra]


def safety_faults():
    import shutil

    from optimum_prune import output as output_module
    from optimum_prune.engine.activations import ActivationStore

    root, model_dir, calib = cli_workspace()

    def args(output, *extra, method="sparsegpt", model=model_dir):
        return cli_args(model, calib, output, *extra, method=method)

    def files(folder):
        return sorted(os.listdir(folder))

    def working_directory():
        before, here = files(root), os.getcwd()
        os.chdir(root)
        try:
            result = cli(*args(".", "--overwrite"))
        finally:
            os.chdir(here)
        return f"{result}; files kept: {files(root) == before}"

    row("`--output .` in the folder of the model and data, `--overwrite`", working_directory)
    row("`--output` the model folder, `--overwrite`", lambda: cli(*args(model_dir, "--overwrite")))

    def filesystem_root():
        deleted, real = [], output_module.remove_tree
        output_module.remove_tree = deleted.append
        try:
            return f"{cli(*args('/', '--overwrite'))}; folders deleted: {deleted}"
        finally:
            output_module.remove_tree = real

    row("`--output /`, `--overwrite` (delete function recording instead of deleting)", filesystem_root)

    def not_ours():
        folder = os.path.join(root, "thesis")
        os.makedirs(folder)
        with open(os.path.join(folder, "thesis.tex"), "w") as handle:
            handle.write("years of work")
        return f"{cli(*args(folder, '--overwrite'))}; thesis.tex kept: {os.path.isfile(os.path.join(folder, 'thesis.tex'))}"

    row("`--overwrite` of a folder that is not an optimum-prune output", not_ours)

    def in_use(code, argv):
        proc = holder(code)
        try:
            return cli(*argv).replace(str(proc.pid), "<pid>")
        finally:
            proc.kill()
            proc.wait()

    busy = os.path.join(root, "busy")
    row("second run on an output another run is writing",
        lambda: in_use(f"from optimum_prune.output import OutputFolder\nOutputFolder({busy!r}).reserve()", args(busy)))
    ckpt = os.path.join(root, "ckpt")
    row("second run on a checkpoint folder in use",
        lambda: in_use(f"from optimum_prune.engine.checkpoint import LayerCheckpoint\nLayerCheckpoint({ckpt!r}).acquire()",
                       args(os.path.join(root, "o1"), "--checkpoint-dir", ckpt, "--resume")))

    def stale_lock():
        proc = holder(f"from optimum_prune.engine.checkpoint import LayerCheckpoint\nLayerCheckpoint({ckpt!r}).acquire()")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f"lock file left: {os.path.exists(os.path.join(ckpt, 'checkpoint.lock'))}; then {cli(*args(os.path.join(root, 'o2'), '--checkpoint-dir', ckpt))}"

    row("lock of a run killed with SIGKILL", stale_lock)

    def edited_checkpoint():
        folder, victim = os.path.join(root, "ck-edit"), os.path.join(root, "victim.txt")
        with open(victim, "w") as handle:
            handle.write("precious")
        interrupted_checkpoint(folder)
        state = json.load(open(os.path.join(folder, STATE_NAME)))
        json.dump({**state, "inputs": victim}, open(os.path.join(folder, STATE_NAME), "w"))
        result = outcome(lambda: Pruner(config()).prune(tiny(), IDS, progress=False, checkpoint_dir=folder, resume=True))
        return f"{result}; victim kept: {os.path.isfile(victim)}"

    row("checkpoint.json edited to name a file elsewhere, then resume", edited_checkpoint)

    def user_files():
        folder = os.path.join(root, "ck-user")
        os.makedirs(folder)
        for name in ("layer-notes.txt", "inputs-2024.csv"):
            open(os.path.join(folder, name), "w").close()
        pruner = Pruner(config())
        pruner.prune(tiny(), IDS, progress=False, checkpoint_dir=folder)
        pruner.checkpoint.clear()
        return f"after the checkpoint is cleared the folder holds: {files(folder)}"

    row("user's files `layer-notes.txt`, `inputs-2024.csv` in the checkpoint folder", user_files)

    def read_only(target_flag):
        folder = os.path.join(root, "ro-" + target_flag)
        os.makedirs(folder)
        os.chmod(folder, 0o555)
        real = os.access
        os.access = lambda p, mode, **k: False if str(p).startswith(folder) and mode & os.W_OK else real(p, mode, **k)
        try:
            if target_flag == "output":
                return cli(*args(os.path.join(folder, "out")))
            return cli(*args(os.path.join(root, "o3"), "--checkpoint-dir", os.path.join(folder, "ck")))
        finally:
            os.access = real
            os.chmod(folder, 0o755)

    row("read-only parent of `--output` (checked before loading the model)", lambda: read_only("output"))
    row("read-only `--checkpoint-dir`", lambda: read_only("checkpoint"))

    def symlink():
        os.makedirs(os.path.join(root, "real"))
        os.symlink(os.path.join(root, "real"), os.path.join(root, "link"))
        return cli(*args(os.path.join(root, "link")))

    row("symlinked `--output`", symlink)
    same = os.path.join(root, "same")
    row("`--checkpoint-dir` equal to `--output`", lambda: cli(*args(same, "--checkpoint-dir", same)))

    def permissions():
        previous = os.umask(0o022)
        try:
            save_pruned(tiny(2), os.path.join(root, "perm"), config())
        finally:
            os.umask(previous)
        return f"mode {oct(os.stat(os.path.join(root, 'perm')).st_mode & 0o777)}"

    row("output folder permissions under umask 022", permissions)

    def killed_overwrite():
        out = os.path.join(root, "perm")
        real = output_module.remove_tree
        output_module.remove_tree = lambda path: (_ for _ in ()).throw(KeyboardInterrupt())
        try:
            save_pruned(tiny(2, seed=1), out, config(), overwrite=True)
        except KeyboardInterrupt:
            pass
        finally:
            output_module.remove_tree = real
        new = load_model(out)[0].model.embed_tokens.weight
        return f"output afterwards is the new model: {bool(torch.equal(new, tiny(2, seed=1).model.embed_tokens.weight))}"

    row("`--overwrite` killed after the swap, before the old folder is removed", killed_overwrite)

    def nan_model():
        folder = os.path.join(root, "nan-model")
        model = tiny()
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        model.save_pretrained(folder)
        return cli(*args(os.path.join(root, "o4"), method="magnitude", model=folder))

    row("magnitude on a model with a NaN weight", nan_model)

    def opt_positions():
        folder = os.path.join(root, "opt")
        transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
            word_embed_proj_dim=64, max_position_embeddings=64)).save_pretrained(folder)
        _tokenizer().save_pretrained(folder)
        argv = args(os.path.join(root, "o5"), model=folder)
        argv[argv.index("--seqlen") + 1] = "80"
        return cli(*argv)

    row("OPT with `--seqlen 80` above its 64 positions", opt_positions)
    empty = os.path.join(root, "empty-config")
    os.makedirs(empty)
    row("`--config` naming a folder without pruning_config.json", lambda: cli("--config", empty, *args(os.path.join(root, "o6"))))

    def damaged_checkpoint():
        folder = os.path.join(root, "ck-damaged")
        interrupted_checkpoint(folder)
        path = os.path.join(folder, "layer-00000.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:100])
        return cli(*args(os.path.join(root, "o7"), "--checkpoint-dir", folder, "--resume"))

    row("checkpoint file truncated, then `--resume`", damaged_checkpoint)

    def near_one():
        stats = InputStatistics(64, get_method("wanda").statistics | {"sq_norm"})
        stats.update(torch.randn(100, 64))
        (result,) = get_method("wanda")().prune_linears([torch.randn(16, 64)], stats,
                                                          Target(0.999, config().parsed_pattern))
        return f"fewest weights kept in a row: {int((result.weight != 0).sum(1).min())} of 64"

    row("wanda `--sparsity 0.999` (rows of 64 inputs)", near_one)

    def killed_activations():
        folder = os.path.join(root, "acts")
        os.makedirs(folder)
        subprocess.run([sys.executable, "-c", (
            "import os, signal, torch\nfrom optimum_prune.engine.activations import ActivationStore\n"
            f"s = ActivationStore('disk', {folder!r})\ns.append(torch.ones(2, 3))\nos.kill(os.getpid(), signal.SIGKILL)")],
            env=ENV)
        left = len(os.listdir(folder))
        store = ActivationStore("disk", folder)
        store.close()
        return f"folders left by the killed run: {left}; after the next run's store: {len(os.listdir(folder))}"

    row("disk activations of a run killed with SIGKILL", killed_activations)
    shutil.rmtree(root, ignore_errors=True)


def mounted_tmpfs(parent: str, size: str) -> str | None:
    """A tmpfs of ``size`` mounted in a new folder of ``parent``, or None where mounting is refused."""
    folder = tempfile.mkdtemp(dir=parent)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
    return folder if done.returncode == 0 else None


def trust_faults():
    """Issue #40's second adversarial pass, each also a test in tests/test_trust.py."""
    import shutil

    from optimum_prune import save_pruned
    from optimum_prune.calibration.data import calibration_windows

    root, model_dir, calib = cli_workspace()

    def args(output, *extra):
        return cli_args(model_dir, calib, output, *extra)

    def users_file_then_overwrite(name: str, make, users_file: str) -> str:
        """``make(folder)``, then a file of the user's in it, then ``--overwrite`` on it."""
        folder = os.path.join(root, name)
        make(folder)
        with open(os.path.join(folder, users_file), "w") as handle:
            handle.write("the user's")
        return f"{cli(*args(folder, '--overwrite'))}; files kept: {sorted(os.listdir(folder))}"

    row("`--overwrite` of a recipe folder (a saved pruning_config.json and the user's notes)",
        lambda: users_file_then_overwrite("recipe", config().save_pretrained, "notes.md"))
    row("`--overwrite` of a previous output the user added a file to",
        lambda: users_file_then_overwrite("prev", lambda folder: cli(*args(folder)), "my-eval.txt"))

    def lookalike():
        mine = os.path.join(root, ".o1.tmp-0a1b2c3d")
        os.makedirs(mine)
        return f"{cli(*args(os.path.join(root, 'o1')))}; {os.path.basename(mine)} kept: {os.path.isdir(mine)}"

    row("a folder `.NAME.tmp-0a1b2c3d` of the user's beside the output", lookalike)

    import optimum_prune.pruner as prune_module

    def small_disk(size, checkpoint=False, patch=False):
        disk = mounted_tmpfs(root, size)
        if disk is None:
            return "tmpfs not mountable here: see tests/test_trust.py (patched writer)"
        original = prune_module.check_free_space
        if patch:  # the disk fills during the run, after the check
            prune_module.check_free_space = lambda *a: None
        try:
            if checkpoint:
                result = cli(*args(os.path.join(root, "o-disk"), "--checkpoint-dir", os.path.join(disk, "ckpt")))
            else:
                result = cli(*args(os.path.join(disk, "out")))
            return f"{result}; left on the disk: {sorted(os.listdir(disk))}"
        finally:
            prune_module.check_free_space = original
            subprocess.run(["umount", "-l", disk], capture_output=True)

    row("output on a 64 KiB disk (the model takes about 700 KiB)", lambda: small_disk("64k"))
    row("disk fills while saving", lambda: small_disk("64k", patch=True))
    row("disk fills while checkpointing (300 KiB)", lambda: small_disk("300k", checkpoint=True))
    row("`--output \"\"`", lambda: cli(*args("")))
    os.mkfifo(os.path.join(root, "fifo"))
    row("`--output` a FIFO", lambda: cli(*args(os.path.join(root, "fifo"))))
    row("`--output /dev/null`", lambda: cli(*args("/dev/null")))
    row("`--seed 18446744073709551617`", lambda: cli(*args(os.path.join(root, "o2"), "--seed", str(2**64 + 1))))
    row("`--device cuda:3` on this CPU build", lambda: cli(*args(os.path.join(root, "o2"), "--device", "cuda:3")))
    row("`--device banana`", lambda: cli(*args(os.path.join(root, "o2"), "--device", "banana")))
    deep = os.path.join(root, "deep.json")
    with open(deep, "w") as handle:
        handle.write("[" * 100_000 + "]" * 100_000)
    row("`--config` of JSON nested 100,000 deep", lambda: cli(*args(os.path.join(root, "o2"), "--config", deep)))

    def meta_model():
        with torch.device("meta"):
            model = tiny()
        Pruner(config()).prune(model, IDS, progress=False)

    row("Python API: a model with its weights on the meta device", meta_model)
    dry = ["--model", model_dir, "--method", "sparsegpt", "--dataset", calib, "--dry-run"]
    row("`--dry-run --seqlen 100000`", lambda: cli(*dry, "--seqlen", "100000"))
    with open(os.path.join(root, "afile"), "w") as handle:
        handle.write("x")
    row("`--dry-run --output` a file", lambda: cli(*dry, "--output", os.path.join(root, "afile")))

    def local(flag, name):
        start = time.perf_counter()
        here = os.getcwd()
        os.chdir(root)
        try:
            result = cli(*args(os.path.join(root, "o3"), flag, name))
        finally:
            os.chdir(here)
        return f"{result} ({time.perf_counter() - start:.1f} s)"

    row("`--model model/missing` (a folder `model` exists here)", lambda: local("--model", "model/missing"))
    row("`--config ./missing.json`", lambda: local("--config", "./missing.json"))
    empty = os.path.join(root, "empty.txt")
    open(empty, "w").close()
    row("empty `--eval-dataset`", lambda: cli(*args(os.path.join(root, "o4"), "--eval", "--eval-dataset", empty)))
    row("a long text given as calibration_data (a string, not a list)",
        lambda: calibration_windows("A paragraph meant as calibration text. " * 30, _tokenizer(), 4, 32))

    def overlapping():
        with tempfile.TemporaryFile("w+") as log:
            handler = logging.StreamHandler(log)
            logging.getLogger("optimum_prune").addHandler(handler)
            try:
                calibration_windows([" ".join(["a"] * 300)], _tokenizer(), 64, 32)
            finally:
                logging.getLogger("optimum_prune").removeHandler(handler)
            log.seek(0)
            return "warning: " + log.read().strip().splitlines()[0]

    row("`--num-samples 64` x 32 tokens from a 300-token text", overlapping)
    shutil.rmtree(root, ignore_errors=True)


def main():
    logging.basicConfig(level=logging.ERROR)
    for group in (config_faults, model_faults, numeric_faults, output_faults, checkpoint_faults, signal_faults,
                  safety_faults, trust_faults):
        group()
    print("| fault or bad input | what happens |")
    print("|---|---|")
    for fault, text in ROWS:
        print(f"| {fault} | {text} |")


if __name__ == "__main__":
    main()
