"""Evaluate a model (dense, or a pruned folder): perplexity, speed and size, and zero-shot accuracy
with lm-eval. Offline by default: the lm-eval task is built here from the packaged Wikipedia text
(which of four sentences continues an article's first sentence); pass `--tasks boolq,arc_easy` to
run lm-eval's own tasks (their data comes from the Hub).

    python examples/evaluate.py                                   # the packaged SmolLM2-135M
    python examples/evaluate.py --model outputs/smollm2-fasp-20   # a pruned folder
"""

import json
import os
import random
import re
import tempfile

from _common import MODEL, parser, ppl

import optimum_prune  # noqa: F401  (heterogeneous pruned models)
from optimum_prune.assets import packaged_texts
from optimum_prune.evaluation import zero_shot
from optimum_prune.evaluation.zero_shot import local_multiple_choice_task
from optimum_prune.evaluation.speed import measure_speed
from optimum_prune.pruner import load_model


def local_task(folder: str, count: int = 200, seed: int = 0) -> str:
    """A next-sentence multiple-choice task from the packaged held-out Wikipedia leads."""
    rng = random.Random(seed)
    articles = [re.split(r"(?<=[.!?])\s+", text.strip()) for text in packaged_texts("packaged:wiki-leads-eval")]
    articles = [a for a in articles if len(a) >= 2 and 20 < len(a[0]) < 400 and 20 < len(a[1]) < 400]
    others = [s for a in articles for s in a[1:] if 20 < len(s) < 400]
    path = os.path.join(folder, "wiki_next_sentence.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for article in rng.sample(articles, min(count, len(articles))):
            choices = [article[1]] + rng.sample([s for s in others if s != article[1]], 3)
            order = list(range(4))
            rng.shuffle(order)
            handle.write(json.dumps({"context": article[0], "choices": [choices[i] for i in order],
                                     "label": order.index(0)}) + "\n")
    return local_multiple_choice_task(folder, "wiki_next_sentence", path, text="context")


def main():
    p = parser(__doc__)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--tasks", default=None, help="lm-eval tasks (default: the offline wiki_next_sentence task)")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args()

    model, tokenizer = load_model(args.model, dtype="float32")
    speed = measure_speed(model, prompt_length=256, new_tokens=16, repeats=3)
    include = None if args.tasks else local_task(tempfile.mkdtemp())
    accuracy = zero_shot(model, tokenizer, args.tasks or "wiki_next_sentence", limit=args.limit, include_path=include)
    print(json.dumps({"model": args.model, "perplexity": ppl(model, tokenizer, args), "zero_shot": accuracy,
                      "speed": speed.to_dict()}, indent=2))


if __name__ == "__main__":
    main()
