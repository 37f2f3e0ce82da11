"""Zero-shot (or few-shot) accuracy through lm-eval's ``HFLM`` on a model already in memory.

lm-eval is an optional dependency (``pip install optimum-prune[eval]``). Tasks are lm-eval task
names (``boolq``, ``arc_easy``, ``hellaswag``, ...) or tasks defined by YAML files in
``include_path`` (a local task over a local JSON file runs without any hub access).
"""

from __future__ import annotations

import logging

from ..errors import PruningError


logger = logging.getLogger(__name__)

#: the metrics reported per task, in order of preference, when present
METRICS = ("acc", "acc_norm", "exact_match", "f1")


_TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{{text}}}}}"
doc_to_choice: "{{{{{choices}}}}}"
doc_to_target: {label}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def local_multiple_choice_task(folder: str, name: str, data_file: str, text: str = "question",
                               choices: str = "choices", label: str = "label") -> str:
    """Define an lm-eval multiple-choice task over a local JSON-lines file (one object per line
    with a prompt field, a list of choices and the index of the right one); returns ``folder``,
    to pass as ``include_path``. No hub access is needed to run it."""
    import os

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as handle:
        handle.write(_TASK_TEMPLATE.format(name=name, data_file=os.path.abspath(data_file), text=text,
                                           choices=choices, label=label))
    return folder


def parse_tasks(tasks) -> list[str]:
    """``"boolq,arc_easy"`` or a list -> a list of task names."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, (list, tuple)):
        raise PruningError(f"tasks must be a comma-separated string or a list of lm-eval task names, got {tasks!r}.")
    names = [str(t).strip() for t in tasks if str(t).strip()]
    if not names:
        raise PruningError("No lm-eval task given; pass e.g. tasks='boolq,arc_easy'.")
    return names


def zero_shot(
    model,
    tokenizer,
    tasks,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model``; returns ``{task: {metric: value}}`` with the metrics of
    `METRICS` that the task reports (and their ``*_stderr``).

    Args:
        limit: at most this many documents per task (an int) or this fraction of them (a float < 1).
        include_path: a folder of extra task YAML files (for example a local task over a JSON file).
    """
    names = parse_tasks(tasks)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PruningError("Zero-shot evaluation needs lm-eval: pip install 'optimum-prune[eval]' (or lm-eval).") from None
    if tokenizer is None:
        raise PruningError("Zero-shot evaluation needs the model's tokenizer.")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise PruningError(
            f"Unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, or define them in YAML files in a "
            f"folder passed as include_path (--tasks-include)."
        )
    device = model.get_input_embeddings().weight.device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(device if device.type != "meta" else "cpu"))
    was_training = model.training
    model.eval()
    try:
        output = simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                 log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    results = {}
    for task, values in output["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            base = metric.removesuffix("_stderr")
            if base in METRICS and isinstance(value, (int, float)):
                metrics[metric] = float(value)
        if metrics:
            results[task] = metrics
    return results
