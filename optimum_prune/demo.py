"""The one-command demo: SmolLM2-135M pruned to 50% with SparseGPT on Wikipedia text, offline.

    python -m optimum_prune.demo [--output DIR] [any optimum-cli prune flag]

Both the model and the text come from PyPI packages (see ``optimum_prune.assets``); the pruned
model is saved to ``outputs/smollm2-135m-sparsegpt-50`` and perplexity is printed before and after.
"""

import sys

from .commands.prune import main


DEFAULTS = {
    "--model": "packaged:smollm2-135m",
    "--method": "sparsegpt",
    "--sparsity": "0.5",
    "--dataset": "packaged:wiki-leads",
    "--num-samples": "64",
    "--seqlen": "512",
    "--eval-windows": "32",
    "--output": "outputs/smollm2-135m-sparsegpt-50",
}


def run(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [item for key, value in DEFAULTS.items() if key not in argv for item in (key, value)]
    flags = ["--eval"] if "--eval" not in argv else []
    return main(args + flags + argv)


if __name__ == "__main__":
    sys.exit(run())
