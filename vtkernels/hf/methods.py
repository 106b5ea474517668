"""Which vtk ops each method runs: options, scoring, selection (ALGORITHMS.md).

Nothing here knows a model family: the adapters hand in q/k, features and grids.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops, reference
from .base import Adapter, Plan

# method -> (accepted options with their defaults); None = required. Methods registered with
# ``vtkernels.hf.register_method`` are added here too.
METHODS: Dict[str, Dict[str, object]] = {
    "fopru_rank": {"keep": None},
    "fopru_row": {"keep": None},
    "vispruner": {"keep": None, "important_ratio": 0.5, "dedup_step": 8},
    "prumerge": {"knn": 32, "per_sample": True},
    "prumerge_plus": {"knn": 32, "per_sample": True},
}

# The training-free methods this package runs itself (the rest come from register_method).
BUILTIN = tuple(METHODS)

_OP_OF = {"vispruner": "vispruner_select", "prumerge": "prumerge", "prumerge_plus": "prumerge"}


def make_plan(method: str, options: dict, adapter: Adapter) -> Plan:
    """Validates ``options`` for ``method`` on ``adapter``'s model; ValueError naming the option."""
    if method not in BUILTIN:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    accepted = METHODS[method]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} takes options {sorted(accepted)}, got unknown {unknown}")
    values = {k: options.get(k, d) for k, d in accepted.items()}
    N = adapter.max_keep()
    if "keep" in values:
        keep = values["keep"]
        span = f"1..{N}" if N is not None else ">= 1"
        if keep is None:
            raise ValueError(f"method {method!r} needs keep= ({adapter.unit}, {span})")
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise ValueError(f"keep must be an int, got {keep!r}")
        if N is not None and not 1 <= keep <= N:
            raise ValueError(f"keep={keep} must be in [1, {N}]: each image (crop) has {N} visual tokens")
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 ({adapter.unit})")
    if "important_ratio" in values:
        r = values["important_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {r!r}")
        values["important_ratio"] = float(r)
    for name in ("dedup_step", "knn"):
        if name in values:
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if "per_sample" in values and not isinstance(values["per_sample"], bool):
        raise ValueError(f"per_sample must be a bool, got {values['per_sample']!r}")
    op = _OP_OF.get(method)
    if op is not None and not hasattr(ops, op):
        raise NotImplementedError(f"method {method!r} needs vtkernels.ops.{op}, which this build lacks")
    plan = Plan(method=method, **values)
    adapter.validate(plan)
    return plan


# --------------------------------------------------------------------------- scoring

def cls_tower_scores(plan: Plan, q: Tensor, k: Tensor, num_heads: int) -> Tensor:
    """[B, N] patch scores of a tower with CLS (token 0) from one layer's q and k [B, T, C]."""
    if plan.merges:
        # PruMerge: CLS row of a single-head attention over all channels of the last layer.
        return ops.cls_attention(q, k, 1)
    if plan.method == "vispruner":
        return ops.cls_attention(q, k, num_heads)
    return ops.fopru_significance(q, k, num_heads)


# --------------------------------------------------------------------------- selection

def select_fixed(plan: Plan, x: Tensor, scores: Tensor, keep: int, grid_width: int) -> Tuple[Tensor, Tensor]:
    """Fixed-budget methods on a group of same-shape images: (tokens [g, keep, D], indices
    [g, keep] ascending). ``grid_width`` is the width of the candidates' grid (FoPru row)."""
    if plan.method == "vispruner":
        idx = ops.vispruner_select(x, scores, keep, plan.important_ratio, plan.dedup_step)
        return ops.gather_tokens(x, idx), idx
    strategy = "rank" if plan.method == "fopru_rank" else "row"
    return ops.fopru_select(x, scores, keep, strategy, grid_width)


def merge(plan: Plan, x: Tensor, keys: Tensor, scores: Tensor) -> Tuple[Tensor, List[int]]:
    """PruMerge / PruMerge+ on a group: (tokens [g, M, D] zero-padded, lengths; the merged
    tokens in the op's order, then the summary token)."""
    tokens, lengths = ops.prumerge(x, keys, scores, plan.knn, plan.plus, plan.per_sample)
    return tokens, lengths.tolist()


def merge_centres(scores: Tensor, length: int, plus: bool, count: Optional[int] = None) -> Tensor:
    """Positions of the tokens PruMerge kept (the merge centres), in the op's output order.

    The op returns merged tokens only; the centres follow from its length (kept + 1 summary): the
    best ``count`` by score (descending, as the op orders them), then for PruMerge+ the spatial
    samples that count implies (ascending). ``count``, when given, is tried first; otherwise (or
    if it does not reproduce ``length``) the count is recovered from the length.
    """
    s = scores.float().cpu()
    n = s.shape[0]
    order = reference.rank_order(s[None])[0].tolist()
    kept = length - 1

    def centres(k):
        extra = reference.prumerge_samples(n, k, order[:k]) if plus else []
        return order[:k] + extra

    candidates = ([count] if count is not None else []) + list(range(1, kept + 1))
    for k in candidates:
        c = centres(k)
        if len(c) == kept:
            return torch.tensor(c, dtype=torch.long)
    raise RuntimeError(f"PruMerge returned {length} tokens for {n} candidates: no count reproduces it")


def merge_counts(scores: Tensor, per_sample: bool) -> List[int]:
    """PruMerge's kept count per row of ``scores`` [g, N] (what the op decides)."""
    return reference.prumerge_counts(scores.float().cpu(), per_sample)
