"""The held-out texts the benchmarks measure perplexity on: the evaluation split of the packaged
Wikipedia leads (the calibration corpus's own held-out split) and the Python reference shipped
with CPython (``pydoc_data.topics``: prose and code, a different distribution)."""

from __future__ import annotations

TEXTS = {"wiki": "packaged:wiki-leads-eval", "python": "pydoc"}


def python_reference() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]


def evaluation_text(name: str):
    """What `optimum_prune.evaluation.perplexity` takes for the text ``name`` of `TEXTS`."""
    return python_reference() if TEXTS[name] == "pydoc" else TEXTS[name]


def perplexities(model, tokenizer, seqlen: int, max_windows: int) -> dict:
    """Perplexity of ``model`` on every text of `TEXTS` (non-overlapping windows of ``seqlen``)."""
    from optimum_prune.evaluation import perplexity

    return {name: perplexity(model, tokenizer, evaluation_text(name), seqlen=seqlen, max_windows=max_windows)
            for name in TEXTS}
