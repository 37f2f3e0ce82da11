"""The shared vocabulary of what a prune asks for: a sparsity pattern, its sparsity, and the
`Target` one weight matrix must reach.

A low module with no dependency but `errors`: the configuration, the methods and the engine all
speak it, and none of them imports another to get it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PruningError


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed pattern: ``unstructured``, ``N:M`` (at most N non-zeros in every M inputs) or ``structured``."""

    kind: str  # "unstructured" | "nm" | "structured"
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "SparsityPattern":
        if not isinstance(text, str):
            raise PruningError(f"pattern must be a string such as 'unstructured', '2:4' or 'structured', got {text!r}.")
        lowered = text.strip().lower()
        if lowered in ("unstructured", "structured"):
            return cls(lowered)
        match = _NM_RE.match(lowered)
        if match is None:
            raise PruningError(
                f"Unknown pattern {text!r}; use 'unstructured', an N:M pattern such as '2:4', or 'structured'."
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise PruningError(f"N:M pattern {text!r} needs 0 < N < M (for example '2:4' keeps 2 of every 4 weights).")
        return cls("nm", n, m)

    @property
    def family(self) -> str:
        """What methods declare support for: 'unstructured', 'n:m' or 'structured'."""
        return "n:m" if self.kind == "nm" else self.kind

    @property
    def implied_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def resolve_sparsity(sparsity: float | None, pattern: SparsityPattern, where: str = "") -> float:
    """The effective sparsity: N:M fixes it, otherwise it must lie in [0, 1)."""
    implied = pattern.implied_sparsity
    if implied is not None:
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-6:
            raise PruningError(
                f"{where}pattern {pattern} always gives sparsity {implied:g}, but sparsity={sparsity!r} was asked; "
                f"drop the sparsity or use pattern 'unstructured'."
            )
        return implied
    if sparsity is None:
        return 0.5
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise PruningError(f"{where}sparsity must be a number in [0, 1), got {sparsity!r}.")
    if not 0.0 <= float(sparsity) < 1.0:
        raise PruningError(f"{where}sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity!r}.")
    return float(sparsity)


@dataclass(frozen=True)
class Target:
    """What one Linear must reach: a sparsity fraction under a pattern.

    For unstructured targets, methods choose a scope: ``"row"`` removes ``round(in * sparsity)``
    weights of every output row, ``"matrix"`` removes ``round(numel * sparsity)`` anywhere in it;
    either keeps at least one weight (`methods.masks.budget`).
    """

    sparsity: float
    pattern: SparsityPattern

    @property
    def is_nm(self) -> bool:
        return self.pattern.kind == "nm"

    def check_width(self, in_features: int, name: str = "") -> None:
        if self.is_nm and in_features % self.pattern.m:
            raise PruningError(
                f"{name or 'a Linear'} has {in_features} inputs, not a multiple of M={self.pattern.m} for pattern "
                f"{self.pattern}; exclude it with ignore=[...] or choose an M that divides {in_features}."
            )
