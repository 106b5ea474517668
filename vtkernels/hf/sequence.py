"""Compaction of the language model's inputs: ids, attention mask, labels and position ids together.

The processor made one placeholder per visual token of the unpruned model. After pruning, each
image keeps some of its placeholders (``ordinals``: which ones, in the order its pruned tokens
come; a repeat duplicates a placeholder, e.g. PruMerge's summary token on Qwen takes the ids of
the image's last merge unit); everything else (text, padding, other modalities) stays. Rows that
end up shorter are left-padded back to one length, which is where ``generate`` expects padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor


@dataclass
class Compacted:
    ids: Tensor  # [B, Lc]
    mask: Optional[Tensor]  # [B, Lc]; None when the caller gave none and no row was padded
    labels: Optional[Tensor]  # [B, Lc], -100 on padding
    image: Tensor  # [B, Lc] bool: the kept image slots, filled by the images in order
    extras: Dict[str, Tensor] = field(default_factory=dict)  # e.g. position ids, [..., B, Lc]


def compact(input_ids: Tensor, image_token_id: int, placeholders: List[int], ordinals: List[Tensor],
            pad_id: int, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
            extras: Optional[Dict[str, Tensor]] = None, extra_fill: int = 0) -> Compacted:
    """Keeps, of image i's ``placeholders[i]`` placeholders (images in the order they fill them,
    batch rows first), those at ``ordinals[i]`` (non-decreasing, repeats allowed); returns the
    compacted ids, mask, labels and ``extras`` (tensors [..., B, L], e.g. M-RoPE ids [3, B, L],
    gathered along the last dim; new padding gets ``extra_fill``)."""
    B, L = input_ids.shape
    device = input_ids.device
    is_img = input_ids == image_token_id
    total = int(is_img.sum())
    if total != sum(placeholders):
        raise ValueError(f"input_ids hold {total} image tokens but the images need {sum(placeholders)} "
                         "(one image per <image> placeholder run, as the processor makes them)")
    flat_img = is_img.reshape(-1).nonzero().squeeze(1)  # placeholders, in the order images fill them
    starts = torch.tensor([0] + placeholders[:-1], device=device).cumsum(0)
    picked = [starts[i] + o.to(device) for i, o in enumerate(ordinals)]
    img_src = flat_img[torch.cat(picked)] if picked else flat_img[:0]
    other_src = (~is_img).reshape(-1).nonzero().squeeze(1)
    # Sorted by flat position: row by row, columns in order; a repeated placeholder stays next to
    # its original (stable sort, and the image entries come after in the order they were given).
    src = torch.sort(torch.cat([other_src, img_src]), stable=True).values
    rows = src // L
    lens = torch.bincount(rows, minlength=B)
    Lc = int(lens.max()) if B else 0
    first = lens.cumsum(0) - lens
    # Right-align every row: extra padding goes on the left.
    dest = torch.arange(src.numel(), device=device) - first[rows] + (Lc - lens)[rows]
    ids = torch.full((B, Lc), pad_id, dtype=input_ids.dtype, device=device)
    ids[rows, dest] = input_ids.reshape(-1)[src]
    img = torch.zeros((B, Lc), dtype=torch.bool, device=device)
    img[rows, dest] = is_img.reshape(-1)[src]
    padded = bool((lens != Lc).any())
    mask = None
    if attention_mask is not None or padded:
        dtype = torch.long if attention_mask is None else attention_mask.dtype
        mask = torch.zeros((B, Lc), dtype=dtype, device=device)
        mask[rows, dest] = 1 if attention_mask is None else attention_mask.reshape(-1)[src.to(attention_mask.device)].to(device)
    new_labels = None
    if labels is not None:
        new_labels = torch.full((B, Lc), -100, dtype=labels.dtype, device=labels.device)
        new_labels[rows.to(labels.device), dest.to(labels.device)] = labels.reshape(-1)[src.to(labels.device)]
    out = {}
    for name, t in (extras or {}).items():
        lead = t.shape[:-2]
        flat = t.reshape(*lead, B * L)
        o = torch.full((*lead, B, Lc), extra_fill, dtype=t.dtype, device=t.device)
        o[..., rows.to(t.device), dest.to(t.device)] = flat[..., src.to(t.device)]
        out[name] = o
    return Compacted(ids=ids, mask=mask, labels=new_labels, image=img, extras=out)


def text_positions(mask: Optional[Tensor], batch: int, length: int, device) -> Tensor:
    """[B, L] positions as ``generate`` builds them: count only attended tokens; padding gets 0."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
