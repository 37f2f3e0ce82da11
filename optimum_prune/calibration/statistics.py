"""Input statistics of a Linear (or of several Linears that read the same tensor).

Accumulated in float32 on the device the layer runs on: the token count, the per-input sum of
squares (Wanda's ``||X_j||^2``) and, when a method asks for it, the Gram matrix ``X^T X``.

With intra-layer error correction the engine feeds *pairs*: the input ``X`` the Linear sees in the
dense layer and the input ``X*`` it sees once the Linears before it in the layer are pruned. Then
the Gram matrix and norms are those of ``X*`` (what the pruned Linear will see) and ``cross`` is
``X^T X* / n``, which turns the target ``W X`` into one expressed on ``X*`` (`corrected_target`).
"""

from __future__ import annotations

import torch

from ..errors import PruningError


class InputStatistics:
    def __init__(self, in_features: int, kinds, device=None, dtype=torch.float32):
        self.in_features = in_features
        self.count = 0
        self.sq_sum = torch.zeros(in_features, dtype=dtype, device=device) if "sq_norm" in kinds else None
        self.gram_sum = torch.zeros(in_features, in_features, dtype=dtype, device=device) if "gram" in kinds else None
        self.cross_sum = None  # X^T X*, only when fed pairs

    @property
    def paired(self) -> bool:
        return self.cross_sum is not None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        target = self.gram_sum if self.gram_sum is not None else self.sq_sum
        x = x.detach().reshape(-1, x.shape[-1])
        if target is not None:
            x = x.to(device=target.device, dtype=target.dtype)
        self.count += x.shape[0]
        if self.gram_sum is not None:
            self.gram_sum.addmm_(x.T, x)
        if self.sq_sum is not None:
            self.sq_sum.add_(x.square().sum(0))

    @torch.no_grad()
    def update_pair(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        """Accumulate a batch seen by the dense layer (``dense``) and by the partly pruned one (``pruned``)."""
        if self.gram_sum is None:
            raise RuntimeError("Paired statistics need the Gram matrix; declare 'gram' in the method's statistics.")
        if self.cross_sum is None:
            if self.count:
                raise RuntimeError("Cannot mix paired and unpaired batches in one InputStatistics.")
            self.cross_sum = torch.zeros_like(self.gram_sum)
        dense = dense.detach().reshape(-1, dense.shape[-1]).to(device=self.gram_sum.device, dtype=self.gram_sum.dtype)
        self.update(pruned)
        x = pruned.detach().reshape(-1, pruned.shape[-1]).to(device=self.gram_sum.device, dtype=self.gram_sum.dtype)
        self.cross_sum.addmm_(dense.T, x)

    @property
    def cross(self) -> torch.Tensor | None:
        """``X^T X* / n`` (dense inputs against pruned-path inputs), or None when not paired."""
        return None if self.cross_sum is None else self.cross_sum / max(self.count, 1)

    @property
    def gram(self) -> torch.Tensor:
        """Mean outer product ``X^T X / n`` (in x in)."""
        if self.gram_sum is None:
            raise RuntimeError("The Gram matrix was not collected; declare 'gram' in the method's statistics.")
        return self.gram_sum / max(self.count, 1)

    @property
    def input_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens, per input feature."""
        sq = self.sq_sum if self.sq_sum is not None else torch.diagonal(self.gram_sum)
        return sq.sqrt()

    def check_finite(self, where: str) -> None:
        for tensor in (self.sq_sum, self.gram_sum, self.cross_sum):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise PruningError(
                    f"NaN or inf in the calibration inputs of {where}; the model produces non-finite activations "
                    f"there (try float32 or bfloat16 instead of float16, or check the checkpoint)."
                )
