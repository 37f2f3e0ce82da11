"""The benchmarks share one harness (benchmarks/harness.py); every script that takes arguments
builds its parser and answers ``--help`` (imports resolved, shared arguments spelt once), and the
rows file resumes."""

from __future__ import annotations

import json
import os
import sys

from conftest import python_stdout


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPTS = sorted(f for f in os.listdir(BENCHMARKS) if f.endswith(".py") and f != "harness.py"
                 and "parser" in open(os.path.join(BENCHMARKS, f), encoding="utf-8").read())


def test_every_benchmark_with_arguments_answers_help():
    code = (
        "import runpy, sys, contextlib, io\n"
        f"sys.path.insert(0, {BENCHMARKS!r})\n"
        "failed = []\n"
        f"for name in {SCRIPTS!r}:\n"
        f"    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"            runpy.run_path({BENCHMARKS!r} + '/' + name, run_name='__main__')\n"
        "        failed.append(name + ': no exit')\n"
        "    except SystemExit as done:\n"
        "        if done.code not in (0, None) or 'usage:' not in out.getvalue():\n"
        "            failed.append(f'{name}: {done.code}')\n"
        "print(failed)\n"
    )
    assert len(SCRIPTS) >= 12
    assert python_stdout(code, timeout=300).strip() == "[]"


def test_no_benchmark_defines_the_shared_arguments_itself():
    for name in SCRIPTS:
        with open(os.path.join(BENCHMARKS, name), encoding="utf-8") as handle:
            text = handle.read()
        for flag in ('"--seqlen"', '"--num-samples"', '"--eval-windows"', '"--resume"'):
            assert f"add_argument({flag}" not in text, f"{name} defines {flag}; use harness.parser"
        assert "sys.path.insert" not in text and "def in_process" not in text and "mp.get_context" not in text, name
        assert 'open(args.output, "w"' not in text, f"{name} writes its report itself; use harness.write_report"


def test_rows_resume(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        from harness import Rows
    finally:
        sys.path.remove(BENCHMARKS)
    path = str(tmp_path / "rows.jsonl")
    rows = Rows(path, key=lambda row: row["key"])
    calls = []
    first = rows.measured("a", lambda: calls.append("a") or {"key": "a", "value": 1})
    again = Rows(path, key=lambda row: row["key"])
    assert again.measured("a", lambda: calls.append("again") or {"key": "a", "value": 2}) == first
    assert calls == ["a"] and [json.loads(line) for line in open(path)] == [{"key": "a", "value": 1}]
