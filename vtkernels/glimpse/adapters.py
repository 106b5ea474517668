"""What GlimpsePrune training needs from one model family, one class per family.

An adapter turns a checked row into the model's inputs and runs the training forward; the data
set, the loop, the checkpoints and the evaluation (``data.py``, ``train.py``) only call these:

- ``encode(processor, image, row)``: one sample, a dict with ``input_ids`` (prompt, the glimpse
  slot, the answer), ``labels`` (the answer; -100 elsewhere), ``glimpse_index``, the image inputs
  and ``box_mask`` (bool, the model's token grid of that image, raster order);
- ``collate(items, processor)``: a padded training batch; ``prompt_batch(items, processor)``: the
  prompts alone, as the processor gives them for inference (the evaluation prunes through
  ``apply_glimpse``, the inference code itself);
- ``forward(model, head, batch, dropout, generator, training)``: (VIP logits [B, N] float32, LM
  loss), with no pruning, the glimpse at ``glimpse_index``.

LLaVA-1.5 is the one family today. A Qwen2.5-VL adapter would add: the per-image merged grids
(h/2 x w/2 from ``image_grid_thw``, different per image, so masks and VIP calls per image or
padded), the box geometry of its ``smart_resize`` (a resize to multiples of 28, no crop), the
conditions from vision blocks 31, 23, 15, 7 averaged over each merge unit, the raw glimpse logits,
and M-RoPE positions for the glimpse (all three rows) and the shifted answer. Its inference
(``apply_glimpse``) does not exist yet either; ``adapter_for`` says so.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Row, box_grid_mask
from .infer import _inspect, _output, _rotate_half

__all__ = ["LlavaTrainAdapter", "adapter_for", "llava_geometry", "llava_box_mask", "prompt_text"]


def _model_type(model) -> str:
    cfg = getattr(model, "config", model)
    mt = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    return str(mt or "")


def adapter_for(model) -> "LlavaTrainAdapter":
    """The training adapter for a model (or its config). Qwen2.5-VL: NotImplementedError (no
    glimpse inference for it yet, so nothing to train for); any other family: ValueError."""
    mt = _model_type(model)
    if mt == "llava":
        return LlavaTrainAdapter(model)
    if mt.startswith(("qwen2_5_vl", "qwen2_vl", "qwen3_vl")):
        raise NotImplementedError(
            f"GlimpsePrune training for {mt} is not implemented yet: its glimpse inference does not exist "
            "either (docs/glimpse.md, 'Qwen2.5-VL: not yet'). Only LLaVA-1.5 "
            "(LlavaForConditionalGeneration) trains today")
    raise ValueError(f"GlimpsePrune training supports LLaVA-1.5 (model_type 'llava', "
                     f"LlavaForConditionalGeneration); got model_type {mt!r}")


def prompt_text(processor, question: str) -> str:
    """The question as the model's chat prompt with one image, generation prefix included (the
    glimpse goes right after it, where the answer starts)."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


# --------------------------------------------------------------------------- LLaVA-1.5 geometry

def _get(d, key):
    if d is None:
        return None
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def _pads_with_ceil(image_processor) -> bool:
    """Centre crop of an image smaller than the crop: the PIL/NumPy backend pads ceil((c - s) / 2)
    before the image, the torchvision one floor((c - s) / 2)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:
        return True
    return not isinstance(image_processor, TorchvisionBackend)


def llava_geometry(image_processor, width: int, height: int) -> Tuple[float, float, float, float, int, int]:
    """How a LLaVA image processor maps pixel coordinates of a width x height image onto the
    picture the tower sees: (ax, bx, ay, by, out_w, out_h) with x' = ax * x + bx, y' = ay * y + by.

    Follows the processor's own steps and arithmetic (transformers' LLaVA / CLIP image
    processors): pad to square (``do_pad``: centred, offset (S - side) // 2), resize
    (``shortest_edge``: the long side int(s * long / short); or ``height``/``width``), centre crop
    (offset (side - crop) // 2; a smaller side is padded). Other resize modes: ValueError."""
    ax, bx, ay, by = 1.0, 0.0, 1.0, 0.0
    w, h = int(width), int(height)
    if _get_flag(image_processor, "do_pad"):
        s = max(w, h)
        bx += (s - w) // 2
        by += (s - h) // 2
        w = h = s
    if _get_flag(image_processor, "do_resize", True):
        size = getattr(image_processor, "size", None)
        short_edge, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
        if short_edge and not longest:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = int(short_edge), int(int(short_edge) * long / short)
            nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
        elif _get(size, "height") and _get(size, "width") and not short_edge:
            nh, nw = int(_get(size, "height")), int(_get(size, "width"))
        else:
            raise ValueError(f"box geometry: image processor size {dict(size) if size else size!r} is not "
                             "supported (shortest_edge, or height and width)")
        ax, bx = ax * nw / w, bx * nw / w
        ay, by = ay * nh / h, by * nh / h
        w, h = nw, nh
    if _get_flag(image_processor, "do_center_crop"):
        crop = getattr(image_processor, "crop_size", None)
        ch, cw = _get(crop, "height"), _get(crop, "width")
        if not ch or not cw:
            raise ValueError(f"box geometry: crop_size {crop!r} lacks height and width")
        ceil_pad = _pads_with_ceil(image_processor)

        def shift(side, c):
            if side >= c:
                return -((side - c) // 2)
            return math.ceil((c - side) / 2) if ceil_pad else (c - side) // 2

        bx += shift(w, int(cw))
        by += shift(h, int(ch))
        w, h = int(cw), int(ch)
    return ax, bx, ay, by, w, h


def _get_flag(ip, name: str, default: bool = False) -> bool:
    v = getattr(ip, name, None)
    return default if v is None else bool(v)


def llava_box_mask(image_processor, boxes: Sequence[Tuple[float, float, float, float]], width: int, height: int,
                   rows: int, cols: int) -> Tensor:
    """Pixel boxes of a width x height image -> bool [rows * cols] on the tower's token grid:
    through the processor's geometry (``llava_geometry``), clipped to the picture the tower sees
    (a box cropped away entirely marks nothing), normalised by that picture's size, then the grid
    rule of ALGORITHMS.md step 7 (``data.box_grid_mask``). **(fix)**: the published code
    normalises by the original image and ignores padding and cropping."""
    ax, bx, ay, by, ow, oh = llava_geometry(image_processor, width, height)
    mapped = []
    for x1, y1, x2, y2 in boxes:
        u1, u2 = min(max(ax * x1 + bx, 0.0), ow), min(max(ax * x2 + bx, 0.0), ow)
        v1, v2 = min(max(ay * y1 + by, 0.0), oh), min(max(ay * y2 + by, 0.0), oh)
        if u2 > u1 and v2 > v1:
            mapped.append((u1 / ow, v1 / oh, u2 / ow, v2 / oh))
    return box_grid_mask(mapped, rows, cols)


# --------------------------------------------------------------------------- LLaVA-1.5 adapter

def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


class LlavaTrainAdapter:
    """LLaVA-1.5: one image per sample, the 24 x 24 (image_size / patch_size) patch grid."""

    family = "llava"

    def __init__(self, model):
        cfg = getattr(model, "config", model)
        vc = cfg.vision_config
        self.grid = int(vc.image_size) // int(vc.patch_size)
        self.image_token_id = int(cfg.image_token_id)
        self._parts = None
        self._parts_of = None

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    # -- data
    def encode(self, processor, image, row: Row) -> dict:
        enc = processor(images=image, text=prompt_text(processor, row.question), return_tensors="pt")
        ids = enc["input_ids"][0]
        n = int((ids == self.image_token_id).sum())
        if n != self.tokens_per_image:
            raise ValueError(f"line {row.line}: the prompt holds {n} image tokens, the model needs "
                             f"{self.tokens_per_image} (does the question contain '<image>'?)")
        pv = enc["pixel_values"][0]
        ip = processor.image_processor
        *_, ow, oh = llava_geometry(ip, row.width, row.height)
        if tuple(pv.shape[-2:]) != (oh, ow):
            raise ValueError(f"box geometry predicts a {ow}x{oh} picture but the processor made "
                             f"{pv.shape[-1]}x{pv.shape[-2]}: unsupported image processor settings")
        tok = processor.tokenizer
        answer = list(tok(row.answer, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:
            answer.append(int(tok.eos_token_id))  # the answer ends: the model learns to stop
        if not answer:
            raise ValueError(f"line {row.line}: the answer tokenizes to nothing")
        T = ids.shape[0]
        # The glimpse slot's id is never read (its embedding is g(0)); it only must not be an
        # image placeholder.
        slot = torch.tensor([_pad_id(tok)], dtype=ids.dtype)
        input_ids = torch.cat([ids, slot, torch.tensor(answer, dtype=ids.dtype)])
        labels = torch.full_like(input_ids, -100)
        labels[T + 1:] = input_ids[T + 1:]
        mask = llava_box_mask(ip, row.boxes, row.width, row.height, self.grid, self.grid)
        return {"input_ids": input_ids, "labels": labels, "glimpse_index": T, "pixel_values": pv,
                "box_mask": mask, "line": row.line}

    def collate(self, items: Sequence[dict], processor) -> dict:
        """Right padding: every row's positions count from 0, so the glimpse and the answer sit
        where they would alone; padded keys are masked and padded labels are -100."""
        pad = _pad_id(processor.tokenizer)
        B, S = len(items), max(int(it["input_ids"].shape[0]) for it in items)
        ids = torch.full((B, S), pad, dtype=torch.long)
        labels = torch.full((B, S), -100, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.long)
        for b, it in enumerate(items):
            n = it["input_ids"].shape[0]
            ids[b, :n], labels[b, :n], mask[b, :n] = it["input_ids"], it["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "glimpse_index": torch.tensor([it["glimpse_index"] for it in items], dtype=torch.long),
                "pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "box_mask": torch.stack([it["box_mask"] for it in items]),
                "lines": [it["line"] for it in items]}

    def prompt_batch(self, items: Sequence[dict], processor) -> dict:
        """Prompts only, left-padded as generate wants them (what apply_glimpse prunes)."""
        pad = _pad_id(processor.tokenizer)
        lens = [int(it["glimpse_index"]) for it in items]
        B, T = len(items), max(lens)
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, (it, n) in enumerate(zip(items, lens)):
            ids[b, T - n:], mask[b, T - n:] = it["input_ids"][:n], 1
        return {"input_ids": ids, "attention_mask": mask,
                "pixel_values": torch.stack([it["pixel_values"] for it in items])}

    # -- the training forward
    def parts(self, model):
        if self._parts_of is not model:
            self._parts, self._parts_of = _inspect(model), model
        return self._parts

    def forward(self, model, head, batch: dict, dropout: float = 0.1, generator: Optional[torch.Generator] = None,
                training: bool = True) -> Tuple[Tensor, Tensor]:
        """(VIP logits [B, N] float32, mean LM cross-entropy over the answer tokens).

        ALGORITHMS.md step 7: no pruning; the glimpse (input g(0), g(l) added before layer l >= 1,
        dropout on g) sits at ``glimpse_index``, where the first answer token would be, and
        predicts that token; the answer follows one position later. The glimpse row of layer K
        is its query (after RoPE) against that layer's keys; causality limits it to the keys up
        to the glimpse, exactly the keys it sees at inference, so the VIP gets the same A there
        and here."""
        from transformers.masking_utils import create_causal_mask
        p = self.parts(model)
        K = head.reduce_layer
        ids = batch["input_ids"]
        device = ids.device
        B, S = ids.shape
        mask = batch["attention_mask"]
        gidx = batch["glimpse_index"].to(device)
        bidx = torch.arange(B, device=device)
        depth = len(p.tower_layers)
        tower_dtype = next(p.tower.parameters()).dtype
        with torch.no_grad():  # frozen: the tower and the embeddings need no graph
            hs = p.tower(batch["pixel_values"].to(device=device, dtype=tower_dtype),
                         output_hidden_states=True).hidden_states
            feats = p.projector(hs[p.feature_layer][:, 1:])
            conds = [hs[i % (depth + 1)][:, 1:] for i in head.selected_visual_layers]
            emb = p.embed(ids)
            is_img = ids == p.image_token_id
            n_img, N, H = feats.shape
            if n_img != B or int(is_img.sum()) != B * N or N != self.tokens_per_image:
                raise ValueError(f"each sample needs one image of {self.tokens_per_image} tokens: got {n_img} "
                                 f"images of {N} for {B} rows holding {int(is_img.sum())} placeholders")
            emb = emb.masked_scatter(is_img[..., None], feats.to(emb.dtype))
        L = len(p.layers)
        g = head.glimpse_embeddings().unsqueeze(0).expand(B, L, H)
        if training and dropout > 0:
            # Per sample and layer, from the loop's own generator: a resumed run draws the same masks.
            keep = torch.rand(g.shape, generator=generator, device=device) >= dropout
            g = g * keep.to(g.dtype) / (1.0 - dropout)
        g = g.to(emb.dtype)
        h = emb.index_put((bidx, gidx), g[:, 0])
        pos = torch.arange(S, device=device).expand(B, S)
        pe = p.lm.rotary_emb(h, pos)
        causal = create_causal_mask(p.lm.config, h, mask, None, pos)
        got = {}
        attn = p.layers[K].self_attn
        hooks = [attn.q_proj.register_forward_hook(lambda _m, _a, out: got.__setitem__("q", out)),
                 attn.k_proj.register_forward_hook(lambda _m, _a, out: got.__setitem__("k", out))]
        kw = {"attention_mask": causal, "position_ids": pos, "position_embeddings": pe, p.cache_kw: None,
              "use_cache": False}
        try:
            for l, layer in enumerate(p.layers):
                if l > 0:
                    h = h.index_put((bidx, gidx), h[bidx, gidx] + g[:, l])
                h = _output(layer(h, **kw))
        finally:
            for hk in hooks:
                hk.remove()
        # The glimpse row of layer K, as inference computes it (infer.py), differentiably.
        D, Hq = attn.head_dim, p.num_heads
        cos, sin = pe
        q = got["q"][bidx, gidx].view(B, Hq, D)
        k = got["k"].view(B, S, -1, D)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        # In float32 even under bf16 autocast, as ops.glimpse_logits computes it at inference.
        with torch.autocast(device.type, enabled=False):
            q = q * cos[bidx, gidx][:, None] + _rotate_half(q) * sin[bidx, gidx][:, None]
            k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
            k = k.to(dt).repeat_interleave(Hq // k.shape[2], dim=2)
            row = torch.einsum("bhd,bshd->bhs", q.to(dt), k) * attn.scaling
            if not head.use_attention_logits:
                seen = (mask != 0) & (torch.arange(S, device=device)[None] <= gidx[:, None])
                row = row.masked_fill(~seen[:, None], float("-inf")).log_softmax(-1)
        A = row.transpose(1, 2)[is_img].view(B, N, Hq)
        logits = head.predict(A, conds, (self.grid, self.grid))
        # LM loss: position t predicts token t + 1; only the answer's targets are scored, and the
        # LM head runs on those rows alone (a 32K vocabulary over the whole prompt is wasted work).
        target = batch["labels"].to(device)[:, 1:]
        sel = target != -100
        out = p.lm_head(p.lm.norm(h)[:, :-1][sel])
        lm = F.cross_entropy(out.float() if out.dtype in (torch.bfloat16, torch.float16) else out, target[sel])
        return logits, lm
