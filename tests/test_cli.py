"""`optimum-cli prune` in subprocesses: registration, end to end, and bad input (exit 2, nothing written)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import make_texts, make_tokenizer, python_stdout, tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune.methods import satisfies_nm


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = shutil.which("optimum-cli")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


def cli(*args, timeout=240):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "calib.txt").write_text("\n\n".join(make_texts(40)))
    (root / "heldout.txt").write_text("\n\n".join(make_texts(20, seed=1)))
    return root


def test_optimum_cli_lists_prune():
    assert CLI, "optimum-cli is not on PATH: install the package (pip install -e .)"
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    assert "prune" in result.stdout
    assert "export" in result.stdout  # optimum's own commands still work


def test_prune_end_to_end(assets):
    out = assets / "out-2of4"
    result = cli(
        "prune", "--model", str(assets / "tiny-llama"), "--method", "sparsegpt", "--pattern", "2:4",
        "--dataset", str(assets / "calib.txt"), "--num-samples", "8", "--seqlen", "32",
        "--method-kwargs", '{"blocksize": 16}', "--output", str(out), "--eval",
        "--eval-dataset", str(assets / "heldout.txt"), "--eval-windows", "4",
    )
    assert result.returncode == 0, result.stderr
    assert "perplexity before" in result.stdout and "perplexity after" in result.stdout
    results = json.loads((out / "pruning_results.json").read_text())
    assert results["sparsity"] == pytest.approx(0.5)
    assert results["perplexity_after"] > 0
    saved = json.loads((out / "pruning_config.json").read_text())
    assert (saved["method"], saved["pattern"], saved["method_kwargs"]) == ("sparsegpt", "2:4", {"blocksize": 16})
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            assert satisfies_nm(module.weight, 2, 4), name

    # the saved config reproduces the run through --config
    again = cli("prune", "--model", str(assets / "tiny-llama"), "--config", str(out / "pruning_config.json"),
                "--output", str(assets / "out-again"))
    assert again.returncode == 0, again.stderr
    reloaded = AutoModelForCausalLM.from_pretrained(assets / "out-again")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method, extra", [("fasp", []), ("spap", []),
                                           ("policy_gradient", ["--method-kwargs", '{"steps": 10}'])])
def test_structured_end_to_end(assets, method, extra):
    out = assets / f"out-{method}"
    result = cli(
        "prune", "--model", str(assets / "tiny-llama"), "--method", method, "--pattern", "structured",
        "--sparsity", "0.2", "--dataset", str(assets / "calib.txt"), "--num-samples", "8", "--seqlen", "32",
        "--channel-multiple", "1", "--output", str(out), *extra,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "pruning_results.json").read_text())
    # the global method's budget counts whole KV groups across the model: a coarser total
    assert results["sparsity"] == pytest.approx(0.2, abs=0.03 if method == "policy_gradient" else 0.01)
    assert results["parameters_after"] < results["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(out)  # optimum_prune is imported here: no remote code needed
    assert sum(p.numel() for p in model.parameters()) == results["parameters_after"]
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert max(widths) < 128


def test_python_module_entry_point(assets):
    result = subprocess.run(
        [sys.executable, "-m", "optimum_prune.commands", "--model", str(assets / "tiny-llama"), "--method", "magnitude",
         "--sparsity", "0.3", "--output", str(assets / "out-magnitude")],
        capture_output=True, text=True, timeout=240, env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert (assets / "out-magnitude" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "nope"], "Unknown pruning method 'nope'; choose one of"),
        (["--method", "wanda", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--method", "wanda", "--pattern", "3:5"], "not a multiple of M=5"),
        (["--method", "wanda", "--method-kwargs", "{bad"], "--method-kwargs must be a JSON object"),
        (["--method", "wanda", "--dataset", "EMPTY"], "calibration data is empty"),
        (["--method", "wanda", "--dataset", "SHORT"], "fewer than seqlen"),
        (["--method", "wanda", "--no-dataset"], "needs calibration data: pass --dataset"),
        (["--method", "wanda", "--model", "NOT_A_MODEL"], "Could not read the configuration of model"),
        (["--method", "wanda", "--output", "NONEMPTY"], "exists and is not empty"),
        (["--method", "wanda", "--eval"], "--eval needs --eval-dataset"),
    ],
)
def test_bad_input_exit_2_and_nothing_written(assets, tmp_path, extra, fragment):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep").write_text("x")
    replace = {"EMPTY": tmp_path / "empty.txt", "SHORT": tmp_path / "short.txt", "NOT_A_MODEL": tmp_path / "not-a-model",
               "NONEMPTY": nonempty}
    args = {"--model": str(assets / "tiny-llama"), "--output": str(tmp_path / "out"),
            "--dataset": str(assets / "calib.txt"), "--seqlen": "32", "--num-samples": "4"}
    extra = [str(replace.get(a, a)) for a in extra]
    if "--no-dataset" in extra:
        extra.remove("--no-dataset")
        del args["--dataset"]
    for i in range(0, len(extra) - 1):
        if extra[i] in args:
            args[extra[i]] = extra.pop(i + 1)
            extra.pop(i)
            break
    command = ["prune"] + [x for kv in args.items() for x in kv] + extra
    result = cli(*command)
    assert result.returncode == 2, (result.stdout, result.stderr)
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: "), result.stderr
    assert fragment in message[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in nonempty.iterdir()) == ["keep"]


def test_wheel_ships_the_registration_hook(tmp_path):
    """The built wheel holds optimum/commands/register/register_prune.py and no __init__.py on the way
    (optimum's namespace packages must stay open to other distributions)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("optimum_prune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "optimum/commands/register/register_prune.py" in names
    assert not [n for n in names if n.startswith("optimum/") and n.endswith("__init__.py")]
    assert "optimum_prune/commands/prune.py" in names


def test_registration_import_is_light():
    """The optimum-cli registration hook (imported by every optimum-cli call) loads neither torch nor transformers."""
    code = (
        "import sys, optimum.commands.register.register_prune as r; "
        "print('torch' in sys.modules, 'transformers' in sys.modules, len(r.REGISTER_COMMANDS))"
    )
    assert python_stdout(code, timeout=60).strip() == "False False 1"


def test_package_import_loads_no_modelling_class():
    """``import optimum_prune`` (every CLI call pays it) loads neither torch nor any transformers
    modelling module: ``-X importtime`` lists every module imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import optimum_prune"], capture_output=True,
                            text=True, timeout=120, env=ENV)
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "optimum_prune" in imported
    assert not [name for name in imported if name.startswith(("transformers.models", "torch"))]


@pytest.mark.parametrize("flags", [["--sparsity", "1.5"], ["--method", "nope"], ["--pattern", "3:2"],
                                   ["--seqlen", "1"], ["--method-kwargs", "{"], ["--sparsity-profile", "bad"]])
def test_a_bad_flag_value_answers_before_torch_is_imported(flags, tmp_path):
    code = ("import sys; from optimum_prune.commands.prune import main\n"
            f"code = main(['--model', 'x', '--output', {str(tmp_path / 'out')!r}, *{flags!r}])\n"
            "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    if flags[0] == "--sparsity-profile":  # argparse's own choice check
        assert result.returncode == 2 and "invalid choice" in result.stderr
    else:
        assert result.stdout.split() == ["2", "False"], result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("transformers_first", [False, True])
def test_a_heterogeneous_folder_loads_after_the_light_import(tmp_path, transformers_first):
    """Our classes register when a config of theirs is first loaded, whether transformers' Auto
    classes were imported before optimum_prune or after; logits equal the in-memory model's."""
    from optimum_prune import Pruner, PruningConfig

    model = tiny_model("qwen3")
    cfg = PruningConfig(method="fasp", pattern="structured", sparsity=0.25, channel_multiple=1,
                        num_calibration_samples=4, seqlen=16, overrides={"model.layers.0.*": {"sparsity": 0.5}})
    pruner = Pruner(cfg)
    pruner.prune(model, torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0)), progress=False)
    pruner.save_pretrained(tmp_path / "out")
    ids = torch.arange(12).view(1, 12)
    torch.save(model(ids).logits.detach(), tmp_path / "logits.pt")
    imports = ["from transformers import AutoModelForCausalLM", "import optimum_prune"]
    code = "; ".join(imports if transformers_first else imports[::-1]).replace(
        "from transformers", "import sys; from transformers") + "; " + (
        f"import torch; m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}); "
        f"same = torch.equal(m(torch.arange(12).view(1, 12)).logits, torch.load({str(tmp_path / 'logits.pt')!r})); "
        "print(type(m).__name__, same)")
    assert python_stdout(code).split() == ["PrunedQwen3ForCausalLM", "True"]


def test_import_registers_pruned_classes():
    code = (
        "import optimum_prune; from transformers import AutoConfig; "
        "print(type(AutoConfig.for_model('optimum_pruned_llama')).__name__)"
    )
    assert python_stdout(code).strip() == "PrunedLlamaConfig"


def test_alps_end_to_end(assets):
    out = assets / "out-alps"
    result = cli(
        "prune", "--model", str(assets / "tiny-llama"), "--method", "alps", "--sparsity", "0.7",
        "--dataset", str(assets / "calib.txt"), "--num-samples", "8", "--seqlen", "32",
        "--method-kwargs", '{"max_iter": 60}', "--output", str(out),
    )
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.7, abs=0.01)


def test_demo_defaults_and_overrides(monkeypatch):
    from optimum_prune import demo

    seen = {}
    monkeypatch.setattr(demo, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    demo.run(["--output", "elsewhere", "--method", "wanda"])
    argv = seen["argv"]
    assert argv.count("--output") == 1 and argv[argv.index("--output") + 1] == "elsewhere"
    assert argv[argv.index("--method") + 1] == "wanda"
    assert argv[argv.index("--model") + 1] == "packaged:smollm2-135m" and "--eval" in argv


@pytest.mark.parametrize("method, pattern_args, kwargs", [
    ("fista", ["--pattern", "2:4"], '{"rounds": 2}'),
    ("sparsefw", ["--sparsity", "0.6"], '{"iterations": 40}'),
])
def test_optimisation_methods_end_to_end(assets, method, pattern_args, kwargs):
    out = assets / f"out-{method}"
    result = cli(
        "prune", "--model", str(assets / "tiny-llama"), "--method", method, *pattern_args,
        "--dataset", str(assets / "calib.txt"), "--num-samples", "8", "--seqlen", "32",
        "--method-kwargs", kwargs, "--output", str(out),
    )
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if method == "fista":
        assert zeros == pytest.approx(0.5, abs=1e-6) and all(satisfies_nm(w, 2, 4) for w in weights)
    else:
        assert zeros == pytest.approx(0.6, abs=0.01)
    saved = json.loads((out / "pruning_config.json").read_text())
    assert saved["method"] == method and saved["method_kwargs"] == json.loads(kwargs)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")  # the model card, with the command that made the model
    assert "pruned" in card.data.tags and method in card.data.tags
    assert f"prune --model {assets / 'tiny-llama'} --method {method}" in card.text


def test_recovery_and_zero_shot_end_to_end(assets, tmp_path):
    pytest.importorskip("lm_eval")
    from test_evaluation import write_local_task

    tasks = write_local_task(tmp_path / "tasks")
    out = assets / "out-recovered"
    result = cli(
        "prune", "--model", str(assets / "tiny-llama"), "--method", "wanda", "--sparsity", "0.5",
        "--dataset", str(assets / "calib.txt"), "--num-samples", "8", "--seqlen", "32", "--output", str(out),
        "--eval", "--eval-dataset", str(assets / "heldout.txt"), "--eval-windows", "4",
        "--tasks", "tiny_mc", "--tasks-include", tasks, "--recover", "lora", "--recover-steps", "5",
        "--recover-samples", "16", "--recover-batch-size", "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "pruning_results.json").read_text())
    assert {"perplexity_before", "perplexity_after", "perplexity_recovered"} <= set(results)
    assert all(0 <= results[f"zero_shot_{s}"]["tiny_mc"]["acc"] <= 1 for s in ("before", "after", "recovered"))
    assert results["recovery"]["steps"] == 5 and results["recovery"]["rank"] == 8
    model = AutoModelForCausalLM.from_pretrained(out)  # no peft needed, still exactly 50% sparse
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01) for w in weights)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "lora-recovery" in card.data.tags and "pruned + LoRA recovery" in card.text and "tiny_mc" in card.text


def test_tasks_without_lm_eval_fail_before_loading(assets, tmp_path):
    code = (
        "import sys, importlib.util; real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'lm_eval' else real(name, *a)\n"
        "from optimum_prune.commands.prune import main\n"
        f"sys.exit(main(['--model', '/nonexistent', '--output', {str(tmp_path / 'o')!r}, '--tasks', 'boolq', "
        f"'--dataset', 'packaged:wiki-leads']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2 and "pip install 'optimum-prune[eval]'" in result.stderr


def test_cli_reference_documents_every_flag():
    import argparse

    from optimum_prune.commands.prune import add_prune_arguments

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    flags.discard("--help")
    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as handle:
        text = handle.read()
    missing = sorted(flag for flag in flags if f"`{flag}`" not in text)
    assert not missing, f"docs/cli.md does not document {missing}"


def test_config_flags_are_the_config_fields():
    """The CLI's config flags come from one table keyed by PruningConfig fields: every field is a
    flag there or one of the three documented exceptions, and a flag sets its field."""
    import argparse

    from optimum_prune import PruningConfig
    from optimum_prune.commands.prune import CONFIG_FLAGS, add_prune_arguments, build_config

    listed = [field for field, _, _ in CONFIG_FLAGS]
    assert sorted(listed) == sorted(set(PruningConfig.field_names()) - {"overrides", "method_kwargs", "sequential"})
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    args = parser.parse_args(["--model", "m", "--output", "o", "--num-samples", "7", "--messages-column", "chat",
                              "--calibration-format", "chat", "--expert-calibration", "all", "--targets", "*.mlp.*"])
    config = build_config(args)
    assert (config.num_calibration_samples, config.messages_column, config.calibration_format,
            config.expert_calibration, config.targets) == (7, "chat", "chat", "all", ["*.mlp.*"])


def test_examples_parse_their_arguments():
    """Every example imports (the package API it uses exists) and answers --help."""
    code = (
        "import glob, os, runpy, sys\n"
        f"os.chdir({os.path.join(REPO, 'examples')!r}); sys.path.insert(0, '.')\n"
        "for script in sorted(glob.glob('[a-z]*.py')):\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as exit_:\n"
        "        assert exit_.code == 0, script\n"
        "    print('ok', script)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("ok ") == 6, result.stdout


def test_flag_choices_come_from_one_place():
    """Every flag with a fixed set of values takes it from optimum_prune.fields (what the config checks)."""
    import argparse

    from optimum_prune import fields
    from optimum_prune.commands.prune import add_prune_arguments

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    lists = [value for value in vars(fields).values() if isinstance(value, tuple)]
    with_choices = [action for action in parser._actions if action.choices]
    assert len(with_choices) >= 8
    assert all(any(action.choices is found for found in lists) for action in with_choices), \
        [action.dest for action in with_choices if not any(action.choices is found for found in lists)]
