"""The ``vtk_pruning`` option of a pruned vLLM model, checked once, with messages a user can act on.

vLLM fixes the number of placeholder tokens of an image when it processes the prompt, before the
vision tower runs, so only methods whose token count is known in advance can serve: the
fixed-budget ones. The adaptive methods (PruMerge, PruMerge+, GlimpsePrune) choose their count
from the image (or, GlimpsePrune, inside the language model) and are refused at engine start.

This module imports neither vLLM nor the model code, so it can be used (and tested) anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["ADAPTIVE_METHODS", "METHODS", "PruningOptions", "parse_options"]

# method -> accepted options with their defaults (None = required); the HF adapter's defaults.
METHODS: dict = {
    "fopru_rank": {"keep": None},
    "fopru_row": {"keep": None},
    "vispruner": {"keep": None, "important_ratio": 0.5, "dedup_step": 8},
}

ADAPTIVE_METHODS = ("prumerge", "prumerge_plus", "glimpse")

CONFIG_KEY = "vtk_pruning"


@dataclass(frozen=True)
class PruningOptions:
    method: str
    keep: int
    important_ratio: float = 0.5
    dedup_step: int = 8


def _example(arch: str) -> str:
    return (f'hf_overrides={{"architectures": ["{arch}"], '
            f'"{CONFIG_KEY}": {{"method": "vispruner", "keep": 64}}}}')


def parse_options(hf_config: Any, arch: str, max_keep: Optional[int] = None) -> PruningOptions:
    """Reads ``hf_config.vtk_pruning`` (set by ``hf_overrides`` or present in config.json).

    ``max_keep``: tokens per image when every image has the same count (LLaVA-1.5: the patch
    grid); ``keep`` above it is an error. None where images differ in size (Qwen2.5-VL: an image
    with at most ``keep`` merge units keeps them all). Raises ValueError naming the bad part.
    """
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        raise ValueError(f"{arch} needs the pruning method in the model config: pass {_example(arch)}")
    if not isinstance(raw, Mapping):
        raise ValueError(f"{CONFIG_KEY} must be a dict such as "
                         f'{{"method": "vispruner", "keep": 64}}, got {raw!r}')
    opts = dict(raw)
    method = opts.pop("method", None)
    if method is None:
        raise ValueError(f"{CONFIG_KEY} needs a 'method': one of {', '.join(METHODS)}")
    if method in ADAPTIVE_METHODS:
        raise ValueError(
            f"{CONFIG_KEY} method {method!r} chooses how many tokens each image keeps from the image "
            "itself, but vLLM fixes an image's placeholder count when it processes the prompt, before "
            f"the vision tower runs; under vLLM use a fixed-budget method ({', '.join(METHODS)}), or "
            f"run {method!r} with vtkernels.hf")
    if method not in METHODS:
        raise ValueError(f"{CONFIG_KEY}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    accepted = METHODS[method]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise ValueError(f"{CONFIG_KEY} method {method!r} takes options {sorted(accepted)}, "
                         f"got unknown {unknown}")
    values = {k: opts.get(k, d) for k, d in accepted.items()}
    keep = values["keep"]
    bound = f"1..{max_keep}" if max_keep is not None else ">= 1"
    if keep is None:
        raise ValueError(f"{CONFIG_KEY} method {method!r} needs 'keep' (visual tokens kept per image, {bound})")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"{CONFIG_KEY} 'keep' must be an int, got {keep!r}")
    if keep < 1 or (max_keep is not None and keep > max_keep):
        extra = f": each image has {max_keep} visual tokens" if max_keep is not None else ""
        raise ValueError(f"{CONFIG_KEY} 'keep'={keep} must be in {bound}{extra}")
    if "important_ratio" in values:
        r = values["important_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"{CONFIG_KEY} 'important_ratio' must be a number in [0, 1], got {r!r}")
        values["important_ratio"] = float(r)
    if "dedup_step" in values:
        s = values["dedup_step"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"{CONFIG_KEY} 'dedup_step' must be an int >= 1, got {s!r}")
    return PruningOptions(method=method, **values)
