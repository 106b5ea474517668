"""Pieces shared by the pruned vLLM models: hooks that read q/k, heads gathered across TP ranks."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def hooked(module: nn.Module, hook: Callable, *, pre: bool = False) -> Iterator[None]:
    """``hook`` on ``module`` for the duration of the block (forward hook, or a pre-hook that
    receives the call's keyword arguments too)."""
    if pre:
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def all_heads(t: Tensor, tp_size: int) -> Tensor:
    """``t`` [..., local heads * head_dim] from this tensor-parallel rank -> [..., all heads *
    head_dim]. The scores average over every head of the layer, so each rank gathers the other
    ranks' heads (vLLM shards heads contiguously by rank, in order) and then scores and selects
    on identical inputs: every rank keeps the same tokens without a further exchange."""
    if tp_size == 1:
        return t
    from vllm.distributed import tensor_model_parallel_all_gather
    return tensor_model_parallel_all_gather(t.contiguous(), dim=-1)


def need(got: Dict[str, Tensor], names, where: str) -> None:
    missing = [n for n in names if n not in got]
    if missing:
        raise RuntimeError(f"vtkernels: the hook on {where} did not fire (missing {missing}); "
                           "is the vision tower compiled (torch.compile of the multimodal encoder "
                           "bypasses module hooks)?")
