"""The recovery's memory plan against the real peak (issue #41): two training steps of distillation
and of LoRA on SmolLM2-135M (float32, CPU), each in its own process, at several batch sizes and
window lengths; the peak resident memory above what the process held before the training (the
libraries, the model's weights read once, and for distillation the teacher's copy) against
`recovery.memory.training_memory`'s estimate of the same parts.

    python benchmarks/recovery_memory.py
    python benchmarks/recovery_memory.py --shapes 4x512 2x256 1x1024 --resume rows.jsonl
    python benchmarks/recovery_memory.py --kinds distill distill@disk --shapes 4x512   # the teacher on disk

``distill@disk`` / ``distill@cpu``: the teacher's weights offloaded (`Recovery.teacher_place`); every
distillation row also records the resident memory the teacher's copy took (``teacher MB``).
"""

from __future__ import annotations

import threading
import time

from harness import Rows, command_line, in_process, parser, write_report


def measure(kind: str, batch: int, seqlen: int, queue) -> None:
    import psutil
    import torch

    torch.set_num_threads(2)
    from harness import load_fp32
    from optimum_prune.assets import smollm2_checkpoint
    from optimum_prune.recovery import DistillConfig, LoraRecoveryConfig, recover_distill, recover_lora
    from optimum_prune.recovery.memory import training_memory
    from optimum_prune.workflow import Recovery

    model, _ = load_fp32(smollm2_checkpoint())
    sum(float(p.sum()) for p in model.parameters())  # every weight read: resident before the baseline
    kind, _, place = kind.partition("@")
    recovery = (Recovery(distill=DistillConfig(steps=2, batch_size=batch), teacher_place=place or "device")
                if kind == "distill" else Recovery(LoraRecoveryConfig(steps=2, batch_size=batch)))
    process = psutil.Process()
    before_teacher = process.memory_info().rss
    teacher = recovery.teacher_of(model)
    estimate = training_memory(model, recovery, seqlen)
    ids = torch.randint(0, model.config.vocab_size, (2 * batch, seqlen), generator=torch.Generator().manual_seed(0))
    base = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    start = time.perf_counter()
    if kind == "distill":
        recover_distill(model, teacher, ids, recovery.distill, progress=False)
    else:
        recover_lora(model, ids, recovery.lora, progress=False)
    done.set()
    watcher.join()
    held = {k: v for k, v in estimate.items() if k != "teacher"}  # the teacher is in the baseline
    kind += f"@{place}" if place else ""
    queue.put({"kind": kind, "teacher_mb": (base - before_teacher) / 2**20, "batch": batch, "seqlen": seqlen,
               "measured_mb": (peak - base) / 2**20,
               "estimate_mb": sum(held.values()) / 2**20, "parts_mb": {k: v / 2**20 for k, v in estimate.items()},
               "seconds": time.perf_counter() - start})


def report(rows: list[dict]) -> str:
    lines = [f"Command: `{command_line('recovery_memory.py')}`", "",
             "SmolLM2-135M float32 on the CPU, two training steps per row, each row in its own process. `measured` = "
             "peak resident memory during the training above the process before it (libraries, the weights read, the "
             "distillation teacher's copy); `estimate` = `training_memory`'s parts less the teacher (which the plan "
             "counts too: it is held from before the prune; an offloaded teacher's largest module, brought in for its forward, "
             "is counted in the estimate). `teacher's copy MB` = resident memory the teacher's copy took (`distill@disk`: "
             "its weights written to a temporary folder instead); `training s` = the two steps.", "",
             "| recovery | batch x seqlen | measured MB | estimate MB | estimate / measured | parts of the estimate MB | "
             "teacher's copy MB | training s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in row["parts_mb"].items())
        lines.append(f"| {row['kind']} | {row['batch']} x {row['seqlen']} | {row['measured_mb']:.0f} | "
                     f"{row['estimate_mb']:.0f} | {row['estimate_mb'] / row['measured_mb']:.2f} | {parts} | "
                     f"{row['teacher_mb']:.0f} | {row['seconds']:.1f} |" if "teacher_mb" in row else
                     f"{row['estimate_mb']:.0f} | {row['estimate_mb'] / row['measured_mb']:.2f} | {parts} | - | "
                     f"{row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    found = parser(__doc__, output="recovery-memory.md", resume=True)
    found.add_argument("--shapes", nargs="+", default=["4x512", "2x256", "1x1024"], help="BATCHxSEQLEN")
    found.add_argument("--kinds", nargs="+", default=["distill", "lora"], choices=["distill", "lora", "distill@cpu", "distill@disk"])
    args = found.parse_args(argv)
    rows = Rows(args.resume, key=lambda row: (row["kind"], row["batch"], row["seqlen"]))
    done = []
    for kind in args.kinds:
        for shape in args.shapes:
            batch, seqlen = (int(x) for x in shape.split("x"))
            done.append(rows.measured((kind, batch, seqlen), lambda: in_process(measure, kind, batch, seqlen)))
    write_report(args.output, report([row for row in done if "error" not in row]))


if __name__ == "__main__":
    main()
