import json
import os

import pytest

from optimum_prune import PruningConfig, PruningError, available_methods
from optimum_prune.configuration import CONFIG_NAME, FORMAT_VERSION


def test_defaults_and_nm_sparsity():
    cfg = PruningConfig()
    assert (cfg.method, cfg.sparsity, cfg.pattern) == ("sparsegpt", 0.5, "unstructured")
    assert PruningConfig(pattern="2:4").sparsity == 0.5
    assert PruningConfig(pattern=" 1:4 ").sparsity == pytest.approx(0.75)
    assert PruningConfig(pattern="1:4").pattern == "1:4"


def test_round_trip_dict_json_and_folder(tmp_path):
    cfg = PruningConfig(
        method="wanda",
        sparsity=0.6,
        targets=["*.mlp.*"],
        ignore=["re:.*down_proj"],
        overrides={"*.layers.0.*": {"sparsity": 0.3}},
        num_calibration_samples=16,
        seqlen=128,
        method_kwargs={"scope": "matrix"},
        dataset="packaged:wiki-leads",
    )
    data = cfg.to_dict()
    assert data["format_version"] == FORMAT_VERSION
    assert PruningConfig.from_dict(json.loads(json.dumps(data))) == cfg
    cfg.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file()
    assert PruningConfig.from_pretrained(tmp_path) == cfg
    assert PruningConfig.from_pretrained(tmp_path / CONFIG_NAME) == cfg
    assert cfg.method_options.scope == "matrix"


def test_reads_pruning_config_from_model_config(tmp_path):
    cfg = PruningConfig(method="magnitude", sparsity=0.25)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "pruning_config": cfg.to_dict()}))
    assert PruningConfig.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"method": "nope"}, "choose one of: alps, block-influence, expert-drop, fasp, fista, magnitude, policy_gradient, spap, sparsefw, sparsegpt, wanda, wanda-sp"),
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"sparsity": "half"}, "must be a number"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "diagonal"}, "Unknown pattern"),
        ({"pattern": "2:4", "sparsity": 0.7}, "always gives sparsity 0.5"),
        ({"pattern": "structured"}, "does not support pattern structured"),
        ({"method_kwargs": {"blocksz": 3}}, "options are: blocksize"),
        ({"method": "magnitude", "method_kwargs": {"scope": "column"}}, "scope must be one of"),
        ({"method_kwargs": {"blocksize": 0}}, "blocksize must be a positive integer"),
        ({"num_calibration_samples": 0}, "num_calibration_samples must be an integer >= 1"),
        ({"seqlen": 1.5}, "seqlen must be an integer"),
        ({"dampening": -1}, "dampening must be a non-negative number"),
        ({"targets": ["re:("]}, "invalid regular expression"),
        ({"overrides": {"*.mlp.*": {"sparsity": 2}}}, "overrides['*.mlp.*']: sparsity must be in [0, 1)"),
        ({"overrides": {"*.mlp.*": {"width": 2}}}, "must be a dict with 'sparsity' and/or 'pattern'"),
    ],
)
def test_validation_errors_name_the_fix(kwargs, fragment):
    with pytest.raises(PruningError) as info:
        PruningConfig(**kwargs)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_from_dict_refuses_unknown_fields_and_newer_versions():
    with pytest.raises(PruningError, match="Unknown pruning config field"):
        PruningConfig.from_dict({"method": "wanda", "sparsiti": 0.5})
    with pytest.raises(PruningError, match="upgrade optimum-prune"):
        PruningConfig.from_dict({"method": "wanda", "format_version": FORMAT_VERSION + 1})


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(PruningError, match="not valid JSON"):
        PruningConfig.from_json_file(path)


def test_registry_lists_baselines():
    assert {"magnitude", "wanda", "sparsegpt", "alps"} <= set(available_methods())


def test_method_alias_becomes_the_method_name():
    cfg = PruningConfig(method="pg", pattern="structured", sparsity=0.2)
    assert cfg.method == "policy_gradient" and "pg" not in available_methods()
    assert PruningConfig.from_dict(cfg.to_dict()).method == "policy_gradient"


@pytest.mark.parametrize(
    "method, kwargs, fragment",
    [
        ("alps", {"rho0": 0}, "rho0 must be a positive number"),
        ("alps", {"max_iter": 0}, "max_iter must be a positive integer"),
        ("alps", {"pcg_iters": -1}, "pcg_iters must be an integer >= 0"),
        ("alps", {"warm_start": "sparsegpt"}, "warm_start must be one of"),
        ("alps", {"lr": 1}, "options are: eigh_dtype, max_iter, pcg_iters, rho0, scope, update_every, warm_start"),
        ("fista", {"error_correction": 1}, "fista option error_correction must be true or false"),
        ("fista", {"warm_start": "alps"}, "fista option warm_start"),
        ("fista", {"lambda": 0.1}, "has no option"),
        ("sparsefw", {"alpha": 1.0}, "alpha must be a number in"),
        ("sparsefw", {"step": "armijo"}, "sparsefw option step"),
        ("sparsefw", {"tol": -1}, "tol must be a non-negative number"),
        ("sparsefw", {"refit": "yes"}, "refit must be true or false"),
        ("spap", {"growth": 1.0}, "growth must be > 1"),
        ("spap", {"init": "random"}, "init must be one of"),
        ("expert-drop", {"score": "usage"}, "score must be one of reap, frequency, random"),
        ("expert-drop", {"seed": "0"}, "seed must be an integer"),
    ],
)
def test_method_options_are_validated(method, kwargs, fragment):
    pattern = "structured" if method in ("spap", "expert-drop") else "unstructured"
    with pytest.raises(PruningError, match=fragment.replace("(", r"\(")):
        PruningConfig(method=method, pattern=pattern, method_kwargs=kwargs)


def test_configuration_reference_lists_every_method_option():
    """docs/configuration.md stays in sync with the methods' Options dataclasses."""
    import dataclasses
    import os

    from optimum_prune import available_methods, get_method

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md")
    rows = [line for line in open(path, encoding="utf-8") if line.startswith("| `")]
    for name in available_methods():
        fields = [f.name for f in dataclasses.fields(get_method(name).Options)]
        documented = " ".join(row for row in rows if row.startswith(f"| `{name}` |"))
        missing = [f for f in fields if f"`{f}`" not in documented]
        assert not missing, f"docs/configuration.md lacks options {missing} of method {name!r}"


def test_every_method_has_a_docs_page_listing_its_options():
    import dataclasses

    from optimum_prune.registry import available_methods, get_method

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    index = open(os.path.join(root, "methods.md"), encoding="utf-8").read()
    for name in available_methods():
        path = os.path.join(root, "methods", f"{name}.md")
        assert os.path.isfile(path), f"docs/methods/{name}.md is missing"
        assert f"(methods/{name}.md)" in index, f"docs/methods.md does not link {name}"
        page = open(path, encoding="utf-8").read()
        for section in ("## What it solves", "## When to choose it", "## Options", "## Measured on SmolLM2-135M"):
            assert section in page, (name, section)
        for option in dataclasses.fields(get_method(name).Options):
            assert f"`{option.name}`" in page, f"docs/methods/{name}.md does not document option {option.name}"
