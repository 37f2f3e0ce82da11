"""Hostile input, fuzzed with hypothesis: configs and CLI arguments get a clean validation error
(`PruningError`, or argparse's usage error), never a traceback from deeper inside."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_prune import PruningConfig
from optimum_prune.commands import prune as prune_command
from optimum_prune.errors import PruningError
from optimum_prune.registry import available_methods


FIELDS = list(PruningConfig.field_names())
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["unstructured", "structured", "2:4", "4:8", "0:4", "4:2", "1:1", " 2 : 4 ", "re:(", "re:.*",
                     "*.mlp.*", "packaged:wiki-leads", *available_methods()]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=6)
config_dicts = st.dictionaries(st.sampled_from(FIELDS + ["format_version", "optimum_prune_version", "bogus"]), values,
                               max_size=6)


@SETTINGS
@given(config_dicts)
def test_config_from_dict_accepts_or_explains(data):
    try:
        config = PruningConfig.from_dict(data)
    except PruningError as err:
        assert str(err) and "\n" not in str(err).strip()
        return
    # what validates must round-trip through JSON unchanged
    again = PruningConfig.from_dict(json.loads(config.to_json_string()))
    assert again.to_dict() == config.to_dict()


FLAGS = ["--method", "--sparsity", "--pattern", "--method-kwargs", "--targets", "--ignore", "--channel-multiple",
         "--num-samples", "--seqlen", "--batch-size", "--seed", "--dampening", "--dataset", "--eval-windows",
         "--config", "--checkpoint-dir"]
SWITCHES = ["--one-pass", "--overwrite", "--eval", "--resume", "--skip-memory-check", "--no-progress"]
flag_values = st.one_of(
    st.text(max_size=10),
    st.integers(min_value=-5, max_value=10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(['{"blocksize": 0}', '{"nope": 1}', "[1]", "{", "2:4", "structured", *available_methods()]),
)
argvs = st.lists(st.one_of(st.tuples(st.sampled_from(FLAGS), flag_values).map(list),
                           st.sampled_from(SWITCHES).map(lambda s: [s])), max_size=6).map(
    lambda parts: [token for part in parts for token in part])


class _Reached(Exception):
    """The CLI got past validation and asked for the model."""


@SETTINGS
@given(argvs)
def test_cli_arguments_give_exit_2_or_reach_the_model(tmp_path_factory, argv):
    out = tmp_path_factory.mktemp("fuzz") / "out"
    parser = argparse.ArgumentParser(prog="optimum-prune")
    prune_command.add_prune_arguments(parser)

    def reached(*args, **kwargs):
        raise _Reached

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stderr(stderr):
        monkeypatch.setattr("optimum_prune.pruner.load_model", reached)
        try:
            args = parser.parse_args(["--model", "m", "--output", str(out), *argv])
        except SystemExit as exit_:
            assert exit_.code == 2
            return
        try:
            code = prune_command.run_prune(args)
        except _Reached:
            code = None
    if code is not None:
        assert code == 2 and stderr.getvalue().startswith("error: "), stderr.getvalue()
    assert not out.exists()


@pytest.mark.parametrize("text", ["", "null", "[]", '{"method": 3}', '{"format_version": 99, "method": "wanda"}',
                                  '{"method_kwargs": {"blocksize": "big"}}', "\x00\x01"])
def test_hostile_pruning_config_files(tmp_path, text):
    path = tmp_path / "pruning_config.json"
    path.write_text(text)
    with pytest.raises(PruningError):
        PruningConfig.from_json_file(path)
