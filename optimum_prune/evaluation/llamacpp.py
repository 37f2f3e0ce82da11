"""A GGUF file run by llama.cpp itself (the prebuilt ``xllamacpp`` wheel), for checks and benchmarks.

`LlamaCpp` starts llama.cpp's server in this process on a loopback port and talks to its native
``/completion`` and ``/tokenize`` endpoints: greedy generation from token ids (``ignore_eos``, so
that a fixed number of tokens is compared), tokenisation of text, and llama.cpp's own prompt and
generation timings. ``pip install xllamacpp``.
"""

from __future__ import annotations

import json
import urllib.request

from ..errors import PruningError


class LlamaCpp:
    """llama.cpp serving one GGUF file on 127.0.0.1 (``threads``: CPU threads; ``context``: tokens)."""

    def __init__(self, path: str, context: int = 512, threads: int | None = None):
        try:
            import xllamacpp
        except ImportError:
            raise PruningError("Running a GGUF file needs llama.cpp's Python wheel: pip install xllamacpp") from None
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = context
        params.n_parallel = 1
        params.warmup = False
        params.verbosity = -1
        if threads is not None:
            params.cpuparams.n_threads = threads
            params.cpuparams_batch.n_threads = threads
        self._server = xllamacpp.Server(params)
        self.address = self._server.listening_address
        self.timings: dict = {}

    def _post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(self.address + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The ``max_new_tokens`` greedy tokens after ``ids`` (end-of-sequence not stopping them);
        llama.cpp's timings of the call in ``self.timings``."""
        reply = self._post("/completion", {
            "prompt": [int(i) for i in ids], "n_predict": max_new_tokens, "temperature": 0, "top_k": 1,
            "samplers": ["top_k"], "ignore_eos": True, "return_tokens": True, "cache_prompt": False,
        })
        self.timings = reply.get("timings", {})
        return list(reply["tokens"])

    def tokenize(self, text: str) -> list[int]:
        return list(self._post("/tokenize", {"content": text})["tokens"])

    def close(self) -> None:
        self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
