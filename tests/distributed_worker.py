"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: prune tiny models in
several gloo processes and save each rank's weights (rank 0 also saves the model folder).

    distributed_worker.py OUT METHOD                 one prune (shared solves, the default)
    distributed_worker.py OUT compare METHOD...      each method twice: shared solves, then every
                                                     process solving everything
    distributed_worker.py OUT recover [resume] [kill=RANK:N]
                                                     data-parallel recoveries of one pruned tiny model
                                                     (distillation with a cross-entropy share and the
                                                     hidden term, then LoRA); ``kill`` ends process
                                                     RANK at its N-th distillation step, ``resume``
                                                     continues from OUT/recover-checkpoint (also
                                                     runs without torchrun: the one-process reference)
    distributed_worker.py OUT checkpoint METHOD [resume] [kill=RANK:WHERE:N]
                                                     a prune committing to OUT/checkpoint; ``kill``
                                                     ends process RANK (SIGKILL) at its N-th solve
                                                     piece (WHERE=solve) or commit (WHERE=commit)

``OPTIMUM_PRUNE_TEST_FAIL_RANK=R``: every solve piece of process R raises.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model  # noqa: E402

from optimum_prune import Pruner, PruningConfig  # noqa: E402


#: name -> (PruningConfig fields, tiny family): every kind of work the engine shares
METHODS = {
    "sparsegpt": (dict(method="sparsegpt"), "llama"),
    "wanda-2:4": (dict(method="wanda", pattern="2:4"), "llama"),
    "alps": (dict(method="alps", method_kwargs={"max_iter": 20}), "llama"),
    "fista": (dict(method="fista", method_kwargs={"iterations": 5, "rounds": 2}), "llama"),  # rows split
    "fista-one-pass": (dict(method="fista", method_kwargs={"iterations": 5, "rounds": 2, "error_correction": False},
                            pattern="2:4"), "llama"),
    "magnitude": (dict(method="magnitude"), "llama"),
    "sparsefw": (dict(method="sparsefw", method_kwargs={"iterations": 10}), "llama"),
    "fasp": (dict(method="fasp", pattern="structured"), "llama"),
    "spap": (dict(method="spap", pattern="structured"), "llama"),
    "wanda-sp": (dict(method="wanda-sp", pattern="structured"), "llama"),
    "sparsegpt-moe": (dict(method="sparsegpt"), "mixtral"),
    "expert-drop-moe": (dict(method="expert-drop", pattern="structured"), "mixtral"),
    "fasp-experts": (dict(method="fasp", pattern="structured"), "qwen2_moe"),
}


def calibration_ids():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def model_for(method: str):
    family = METHODS[method][1]
    if family == "llama":
        return tiny_model("llama", num_hidden_layers=3)
    from families import build

    return build(family)


def config(method: str) -> PruningConfig:
    fields = dict(METHODS[method][0])
    if "pattern" not in fields or fields["pattern"] in ("unstructured", "structured"):
        fields.setdefault("sparsity", 0.4)
    return PruningConfig(**fields, num_calibration_samples=8, seqlen=32, batch_size=2, channel_multiple=1)


def weights(model) -> dict:
    return {k: v.contiguous() for k, v in model.state_dict().items() if "rotary" not in k}


def prune(method: str, **kwargs):
    model = model_for(method)
    pruner = Pruner(config(method))
    pruner.prune(model, calibration_ids(), progress=False, **kwargs)
    return model, pruner


def kill_at(where: str, count: int) -> None:
    """End this process at its ``count``-th solve piece or checkpoint commit."""
    from optimum_prune.engine import checkpoint, solves

    seen = [0]

    def counted(original):
        def wrapper(*args, **kwargs):
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return wrapper

    if where == "commit":
        checkpoint.LayerCheckpoint.commit = counted(checkpoint.LayerCheckpoint.commit)
    else:
        piece_init = solves.Piece.__init__

        def init(self, cost, solve):
            piece_init(self, cost, counted(solve))
        solves.Piece.__init__ = init


def fail_solves() -> None:
    """Every solve piece of this process raises (``OPTIMUM_PRUNE_TEST_FAIL_RANK``)."""
    from optimum_prune.engine import solves

    def init(self, cost, solve):
        self.cost, self.solve = cost, lambda: (_ for _ in ()).throw(RuntimeError("injected failure"))
    solves.Piece.__init__ = init


def recover(out: str, rank: int, args: list[str]) -> None:
    """Prune a tiny Llama (magnitude 50%, no calibration), distil it from its dense copy and
    LoRA-tune it, 4 windows per step shared by the processes; save the weights and losses."""
    import copy
    import json

    from optimum_prune.recovery import DistillConfig, LoraRecoveryConfig, recover_distill, recover_lora
    from optimum_prune.recovery import distill as distill_module

    for option in args:
        if option.startswith("kill="):
            who, count = map(int, option[5:].split(":"))
            if who == rank:
                real, calls = distill_module.distillation_loss, [0]

                def killed(*a, **k):
                    calls[0] += 1
                    if calls[0] == count:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **k)
                distill_module.distillation_loss = killed
    model = tiny_model("llama", num_hidden_layers=2, initializer_range=0.2)
    teacher = copy.deepcopy(model)
    Pruner(PruningConfig(method="magnitude", sparsity=0.5)).prune(model, progress=False)
    data = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    settings = DistillConfig(steps=8, lr=1e-3, batch_size=4, ce_weight=0.3, hidden_weight=0.5, save_every=2)
    distilled = recover_distill(model, teacher, data, settings, progress=False,
                                checkpoint_dir=os.path.join(out, "recover-checkpoint"))
    tuned = recover_lora(model, data, LoraRecoveryConfig(steps=6, lr=1e-3, batch_size=4), progress=False)
    save_file(weights(model), os.path.join(out, f"recover-rank{rank}.safetensors"))
    with open(os.path.join(out, f"recover-rank{rank}.json"), "w") as handle:
        json.dump({"distill": distilled["losses"], "lora": [tuned["loss_first"], tuned["loss_last"]]}, handle)


def main(out: str, args: list[str]) -> None:
    if args[0] == "recover" and "WORLD_SIZE" not in os.environ:  # the one-process reference
        recover(out, 0, args[1:])
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if os.environ.get("OPTIMUM_PRUNE_TEST_FAIL_RANK") == str(rank):
        fail_solves()
    if args[0] == "recover":
        recover(out, rank, args[1:])
    elif args[0] == "compare":
        for method in args[1:]:
            for mode in ("shared", "everywhere"):
                os.environ["OPTIMUM_PRUNE_SHARED_SOLVES"] = "1" if mode == "shared" else "0"
                model, _ = prune(method)
                save_file(weights(model), os.path.join(out, f"{method}-{mode}-rank{rank}.safetensors"))
    elif args[0] == "checkpoint":
        method, rest = args[1], args[2:]
        for option in rest:
            if option.startswith("kill="):
                who, where, count = option[5:].split(":")
                if int(who) == rank:
                    kill_at(where, int(count))
        model, _ = prune(method, checkpoint_dir=os.path.join(out, "checkpoint"), resume="resume" in rest)
        save_file(weights(model), os.path.join(out, f"{method}-checkpoint-rank{rank}.safetensors"))
    else:
        method = args[0]
        model, pruner = prune(method)
        save_file(weights(model), os.path.join(out, f"{method}-rank{rank}.safetensors"))
        pruner.save_pretrained(os.path.join(out, f"{method}-model"))  # only rank 0 writes
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
