"""Recovery after pruning: a short LoRA fine-tune with PEFT, merged back into the weights.

One-shot pruning leaves a gap to the dense model that a few hundred steps of low-rank training on
ordinary text close in part. `recover_lora` attaches LoRA adapters (``peft.LoraConfig``) to the
Linears of the decoder layers, trains only them on next-token prediction over token windows,
merges them (``merge_and_unload``) so the saved model needs no peft, and re-applies the sparsity
masks: a merged low-rank update is dense, so the zeros of unstructured / N:M pruning are put
back and the model stays exactly as sparse as before. Structured shapes are untouched (LoRA
adapts the Linears at their pruned sizes).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PruningError, check_positive_int
from ..runtime.distributed import average_gradients, batch_share
from ..structure.layers import find_decoder_layers, select_target_linears
from .training import check_training_inputs, check_training_settings, warmup_cosine


logger = logging.getLogger(__name__)


@dataclass
class LoraRecoveryConfig:
    """Settings of `recover_lora`.

    Args:
        steps: optimiser steps.
        lr: peak learning rate of AdamW (linear warm-up over 10% of the steps, cosine decay).
        rank, alpha: LoRA rank and scaling (``alpha / rank``).
        batch_size: windows per step.
        seed: order of the windows.
        weight_decay: AdamW weight decay of the adapters.
    """

    steps: int = 100
    lr: float = 2e-4
    rank: int = 8
    alpha: int = 16
    batch_size: int = 4
    seed: int = 0
    weight_decay: float = 0.0

    def __post_init__(self):
        check_training_settings(self.steps, self.lr, self.batch_size, self.seed, self.weight_decay)
        check_positive_int(self.rank, "LoRA rank")
        check_positive_int(self.alpha, "LoRA alpha")


def _layer_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layers, by full name."""
    prefix, layers = find_decoder_layers(model)
    return {name: linear for i, layer in enumerate(layers)
            for name, linear in select_target_linears(layer, f"{prefix}.{i}", None, None).items()}


def attach_adapters(model: nn.Module, rank: int, alpha: int, seed: int | None = None):
    """PEFT LoRA adapters (``rank``, ``alpha``, no dropout) on every Linear of the decoder layers;
    only they train. Returns the peft model wrapping ``model``. ``seed``: draw the adapters'
    initial values from it (the global random state left as it was), else from the global state."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PruningError("LoRA recovery needs peft: pip install peft (or optimum-prune[recovery]).") from None
    targets = sorted({name.rsplit(".", 1)[-1] for name in _layer_linears(model)})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    if seed is None:
        return get_peft_model(model, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def merge_adapters(peft_model, model: nn.Module) -> None:
    """Merge the adapters into ``model``'s Linears (in place) and drop peft's wrappers; the caller
    puts a sparse model's zeros back (a merged low-rank update is dense)."""
    if peft_model.merge_and_unload() is not model:
        raise RuntimeError("peft returned a different model object after merging")


def _train(peft_model, windows: torch.Tensor, config: LoraRecoveryConfig, device, progress: bool) -> list[float]:
    """The training loop: AdamW on the adapters over shuffled windows; returns the losses per step."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    peft_model.train()
    bar = tqdm(range(config.steps), desc="LoRA recovery", unit="step", disable=not progress)
    with torch.enable_grad():
        for step in bar:
            if order.numel() < config.batch_size:
                order = torch.cat([order, torch.randperm(windows.shape[0], generator=generator)])
            batch, share = batch_share(windows[order[: config.batch_size]])  # several processes: this one's part
            batch, order = batch.to(device), order[config.batch_size:]
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, config.steps, config.lr)
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            value = average_gradients(params, share, loss)  # the whole batch's gradient and loss everywhere
            if not math.isfinite(value):
                raise PruningError(f"LoRA recovery diverged at step {step} (loss {value}); lower the lr.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def recover_lora(
    model: nn.Module,
    windows: torch.Tensor,
    config: LoraRecoveryConfig | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune LoRA adapters on ``windows`` (n x seqlen token ids), merge them into ``model``
    (in place) and restore its sparsity masks. Returns what was done: the settings, the mean
    training loss of the first and last tenth of the steps, the seconds taken."""
    config = config or LoraRecoveryConfig()
    check_training_inputs("LoRA recovery", windows, model)
    masks = {name: linear.weight.detach() == 0 for name, linear in _layer_linears(model).items()}
    start = time.perf_counter()
    was_training = model.training
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    peft_model = attach_adapters(model, config.rank, config.alpha)
    try:
        losses = _train(peft_model, windows, config, model.get_input_embeddings().weight.device, progress)
    finally:
        merge_adapters(peft_model, model)
        model.train(was_training)
    with torch.no_grad():
        for name, linear in _layer_linears(model).items():
            linear.weight.masked_fill_(masks[name].to(linear.weight.device), 0)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable.get(name, False))
    tenth = max(1, len(losses) // 10)
    return {
        "method": "lora",
        **asdict(config),
        "loss_first": sum(losses[:tenth]) / tenth,
        "loss_last": sum(losses[-tenth:]) / tenth,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seconds": time.perf_counter() - start,
    }
