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
  loss), with no pruning, the glimpse at ``glimpse_index``. When the images of a batch differ in
  size (Qwen2.5-VL), N is the largest image's token count and the batch carries ``box_valid``
  [B, N] (which entries are tokens); ``train.vip_losses`` reads only those.

The families share the sequence layout, the padding and the forward (``_TrainAdapter``): the
glimpse g(0) in the slot, g(l) added before layer l >= 1, dropout on g, layer K's glimpse row
(its query after the rotary against the layer's rotated keys) and the answer's cross-entropy.
A family brings its image tokens and VIP conditions, its positions and its VIP calls:

- LLaVA-1.5 (``LlavaTrainAdapter``): one 24 x 24 (image_size / patch_size) grid per image, CLIP
  hidden states as conditions, positions 0..S-1, the log-softmax of the glimpse row;
- Qwen2.5-VL (``QwenTrainAdapter``): each image's merged grid (h/2 x w/2 of ``image_grid_thw``,
  different per image), the outputs of vision blocks 31, 23, 15, 7 averaged over each merge unit
  (``qwen.run_tower``), M-RoPE positions (``qwen.rope_positions``: the slot is a text token, so
  the glimpse sits at the prompt's last position + 1 in all three rows and the answer one place
  later), the raw glimpse logits, the VIP once per distinct grid of the batch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Row, box_grid_mask
from .infer import _inspect, _output, _rotate_half

__all__ = ["LlavaTrainAdapter", "QwenTrainAdapter", "adapter_for", "llava_geometry", "llava_box_mask",
           "qwen_resized_size", "qwen_box_mask", "prompt_text", "QWEN_IMAGE"]

# The placeholder a Qwen-VL prompt holds for one image (its processor expands <|image_pad|>).
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Qwen-VL families GlimpsePrune has no training (nor inference) for.
_OTHER_QWEN = ("qwen2_vl", "qwen3_vl", "qwen3_5")


def _model_type(model) -> str:
    cfg = getattr(model, "config", model)
    mt = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    return str(mt or "")


def adapter_for(model) -> "_TrainAdapter":
    """The training adapter for a model (or its config): LLaVA-1.5 (model_type ``llava``) or
    Qwen2.5-VL (``qwen2_5_vl``). Other Qwen-VL families: NotImplementedError; anything else:
    ValueError."""
    mt = _model_type(model)
    if mt == "llava":
        return LlavaTrainAdapter(model)
    if mt == "qwen2_5_vl":
        return QwenTrainAdapter(model)
    if mt.startswith(_OTHER_QWEN):
        raise NotImplementedError(
            f"GlimpsePrune training for {mt} is not implemented: of the Qwen-VL families only Qwen2.5-VL "
            "(model_type 'qwen2_5_vl', Qwen2_5_VLForConditionalGeneration) has GlimpsePrune (docs/glimpse.md)")
    raise ValueError(f"GlimpsePrune training supports LLaVA-1.5 (model_type 'llava', LlavaForConditionalGeneration) "
                     f"and Qwen2.5-VL ('qwen2_5_vl', Qwen2_5_VLForConditionalGeneration); got model_type {mt!r}")


def prompt_text(processor, question: str, family: str = "llava") -> str:
    r"""The question as the model's chat prompt with one image, generation prefix included (the
    glimpse goes right after it, where the answer starts).

    The processor's chat template. Without one, LLaVA-1.5's ``USER: <image>\n{q} ASSISTANT:``;
    a Qwen-VL family (``family`` starting with "qwen"; a processor put together from a tokenizer
    and an image processor, as ``vtk`` builds one without torchvision): the tokenizer's chat
    template if it renders the image placeholder, else
    ``user : <|vision_start|><|image_pad|><|vision_end|> {q} assistant :`` (what the small test
    models read)."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    if not family.startswith("qwen"):
        return f"USER: <image>\n{question} ASSISTANT:"
    tok = getattr(processor, "tokenizer", None)
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        if isinstance(text, str) and QWEN_IMAGE in text:
            return text
    return f"user : {QWEN_IMAGE} {question} assistant :"


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


# --------------------------------------------------------------------------- shared by the families

def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def _glimpse_layers(p, head, emb: Tensor, gidx: Tensor, layer_kw: dict, dropout: float,
                    generator: Optional[torch.Generator], training: bool, checkpointing: bool = False):
    """Every decoder layer on ``emb`` with the glimpse at ``gidx`` (input g(0), g(l) added before
    layer l >= 1, dropout on g per sample and layer). Returns (final hidden states, layer K's
    q_proj and k_proj outputs). ``checkpointing``: each layer's activations are recomputed in the
    backward instead of kept (torch.utils.checkpoint, non-reentrant); the dropout masks are drawn
    before, so the recomputation is exact and the gradients are the same."""
    device = emb.device
    B, S, H = emb.shape
    bidx = torch.arange(B, device=device)
    L = len(p.layers)
    g = head.glimpse_embeddings().unsqueeze(0).expand(B, L, H)
    if training and dropout > 0:
        # Per sample and layer, from the loop's own generator: a resumed run draws the same masks.
        keep = torch.rand(g.shape, generator=generator, device=device) >= dropout
        g = g * keep.to(g.dtype) / (1.0 - dropout)
    g = g.to(emb.dtype)
    h = emb.index_put((bidx, gidx), g[:, 0])
    got = {}
    attn = p.layers[head.reduce_layer].self_attn
    hooks = [attn.q_proj.register_forward_hook(lambda _m, _a, out: got.__setitem__("q", out)),
             attn.k_proj.register_forward_hook(lambda _m, _a, out: got.__setitem__("k", out))]
    kw = {**layer_kw, p.cache_kw: None, "use_cache": False}
    def run(layer, x):
        return _output(layer(x, **kw))

    try:
        for l, layer in enumerate(p.layers):
            if l > 0:
                h = h.index_put((bidx, gidx), h[bidx, gidx] + g[:, l])
            if checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint
                h = checkpoint(run, layer, h, use_reentrant=False)
            else:
                h = run(layer, h)
    finally:
        for hk in hooks:
            hk.remove()
    return h, got["q"], got["k"]


def _glimpse_row(p, head, q: Tensor, k: Tensor, pe, gidx: Tensor, mask: Tensor) -> Tensor:
    """Layer K's glimpse row [B, Hq, S] as inference computes it, differentiably: the glimpse's
    query after the rotary against every rotated key (GQA: key head h // (Hq / Hkv)), times the
    layer's scaling; LLaVA (``use_attention_logits`` false): its log-softmax over the keys up to
    the glimpse (padding masked), exactly the keys inference attends to."""
    attn = p.layers[head.reduce_layer].self_attn
    B, S = mask.shape
    device = mask.device
    bidx = torch.arange(B, device=device)
    D, Hq = attn.head_dim, p.num_heads
    cos, sin = pe
    q = q[bidx, gidx].view(B, Hq, D)
    k = k.view(B, S, -1, D)
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
    return row


def _answer_loss(p, h: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the answer tokens: position t predicts token t + 1; the LM head
    runs on those rows alone (a large vocabulary over the whole prompt is wasted work)."""
    target = labels.to(h.device)[:, 1:]
    sel = target != -100
    out = p.lm_head(p.lm.norm(h)[:, :-1][sel])
    return F.cross_entropy(out.float() if out.dtype in (torch.bfloat16, torch.float16) else out, target[sel])


class _TrainAdapter:
    """What the families share: the sequence (prompt, glimpse slot, answer + eos), the padding,
    the parts cache and the training forward. A family adds ``_inspect`` (its parts), ``encode``,
    ``_image_inputs`` (its image tensors of a batch), ``_vision``, ``_positions`` and ``_vip``."""

    family = ""
    image_token_id = -1

    def __init__(self):
        self._parts = None
        self._parts_of = None

    # -- data
    def _sequence(self, processor, ids: Tensor, row: Row) -> dict:
        """input_ids = prompt, slot, answer (+ eos), labels on the answer, glimpse_index."""
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
        if int(slot) == self.image_token_id:
            raise ValueError("the tokenizer's pad (or eos) token is the image placeholder: no id for the glimpse slot")
        input_ids = torch.cat([ids, slot, torch.tensor(answer, dtype=ids.dtype)])
        labels = torch.full_like(input_ids, -100)
        labels[T + 1:] = input_ids[T + 1:]
        return {"input_ids": input_ids, "labels": labels, "glimpse_index": T}

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
                **self._image_inputs(items), **self._box_masks(items), "lines": [it["line"] for it in items]}

    def _box_masks(self, items: Sequence[dict]) -> dict:
        return {"box_mask": torch.stack([it["box_mask"] for it in items])}

    def prompt_batch(self, items: Sequence[dict], processor) -> dict:
        """Prompts only, left-padded as generate wants them (what apply_glimpse prunes)."""
        pad = _pad_id(processor.tokenizer)
        lens = [int(it["glimpse_index"]) for it in items]
        B, T = len(items), max(lens)
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, (it, n) in enumerate(zip(items, lens)):
            ids[b, T - n:], mask[b, T - n:] = it["input_ids"][:n], 1
        return {"input_ids": ids, "attention_mask": mask, **self._image_inputs(items)}

    # -- the training forward
    def parts(self, model):
        if self._parts_of is not model:
            self._parts, self._parts_of = self._inspect(model), model
        return self._parts

    def forward(self, model, head, batch: dict, dropout: float = 0.1, generator: Optional[torch.Generator] = None,
                training: bool = True, checkpointing: bool = False) -> Tuple[Tensor, Tensor]:
        """(VIP logits [B, N] float32, mean LM cross-entropy over the answer tokens).

        ALGORITHMS.md step 7: no pruning; the glimpse (input g(0), g(l) added before layer l >= 1,
        dropout on g) sits at ``glimpse_index``, where the first answer token would be, and
        predicts that token; the answer follows one position later. The glimpse row of layer K
        is its query (after the rotary) against that layer's keys; causality limits it to the
        keys up to the glimpse, exactly the keys it sees at inference, so the VIP gets the same A
        there and here."""
        from transformers.masking_utils import create_causal_mask
        p = self.parts(model)
        ids = batch["input_ids"]
        mask = batch["attention_mask"]
        gidx = batch["glimpse_index"].to(ids.device)
        is_img = ids == p.image_token_id
        with torch.no_grad():  # frozen: the tower and the embeddings need no graph
            feats, conds, grids = self._vision(p, head, batch, is_img)
            emb = p.embed(ids)
            emb = emb.masked_scatter(is_img[..., None], feats.to(emb.dtype))
        pos, pe, mask_pos = self._positions(p, batch, emb)
        causal = create_causal_mask(p.lm.config, emb, mask, None, mask_pos)
        h, q, k = _glimpse_layers(p, head, emb, gidx, {"attention_mask": causal, "position_ids": pos,
                                                       "position_embeddings": pe}, dropout, generator, training,
                                  checkpointing)
        row = _glimpse_row(p, head, q, k, pe, gidx, mask)
        logits = self._vip(head, row.transpose(1, 2)[is_img], conds, grids)
        return logits, _answer_loss(p, h, batch["labels"])


# --------------------------------------------------------------------------- LLaVA-1.5 adapter

class LlavaTrainAdapter(_TrainAdapter):
    """LLaVA-1.5: one image per sample, the 24 x 24 (image_size / patch_size) patch grid."""

    family = "llava"

    def __init__(self, model):
        super().__init__()
        cfg = getattr(model, "config", model)
        vc = cfg.vision_config
        self.grid = int(vc.image_size) // int(vc.patch_size)
        self.image_token_id = int(cfg.image_token_id)

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
        mask = llava_box_mask(ip, row.boxes, row.width, row.height, self.grid, self.grid)
        return {**self._sequence(processor, ids, row), "pixel_values": pv, "box_mask": mask, "line": row.line}

    def _image_inputs(self, items: Sequence[dict]) -> dict:
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items])}

    # -- the training forward
    def _inspect(self, model):
        return _inspect(model)

    def _vision(self, p, head, batch: dict, is_img: Tensor):
        """Image tokens [B, N, H] and the conditions (CLIP hidden states, patches only)."""
        device = is_img.device
        B = is_img.shape[0]
        depth = len(p.tower_layers)
        tower_dtype = next(p.tower.parameters()).dtype
        pixels = batch["pixel_values"].to(device=device, dtype=tower_dtype)
        hs = p.tower(pixels, output_hidden_states=True).hidden_states
        feats = p.projector(hs[p.feature_layer][:, 1:])
        conds = [hs[i % (depth + 1)][:, 1:] for i in head.selected_visual_layers]
        n_img, N, _ = feats.shape
        if n_img != B or int(is_img.sum()) != B * N or N != self.tokens_per_image:
            raise ValueError(f"each sample needs one image of {self.tokens_per_image} tokens: got {n_img} "
                             f"images of {N} for {B} rows holding {int(is_img.sum())} placeholders")
        return feats, conds, None

    def _positions(self, p, batch: dict, emb: Tensor):
        B, S = emb.shape[:2]
        pos = torch.arange(S, device=emb.device).expand(B, S)
        return pos, p.lm.rotary_emb(emb, pos), pos

    def _vip(self, head, A: Tensor, conds, grids) -> Tensor:
        B = conds[0].shape[0]
        return head.predict(A.view(B, self.tokens_per_image, -1), conds, (self.grid, self.grid))


# --------------------------------------------------------------------------- Qwen2.5-VL geometry

def _qwen_pixel_bounds(image_processor) -> Tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen-VL image processor (``size`` shortest_edge /
    longest_edge; older processors: min_pixels / max_pixels attributes)."""
    size = getattr(image_processor, "size", None)
    lo = _get(size, "shortest_edge") or _get(size, "min_pixels") or getattr(image_processor, "min_pixels", None)
    hi = _get(size, "longest_edge") or _get(size, "max_pixels") or getattr(image_processor, "max_pixels", None)
    if not lo or not hi:
        raise ValueError(f"box geometry: the Qwen image processor's size {size!r} gives no pixel bounds "
                         "(shortest_edge and longest_edge)")
    return int(lo), int(hi)


def qwen_resized_size(image_processor, width: int, height: int) -> Tuple[int, int]:
    """(width, height) of the picture a Qwen2.5-VL image processor makes of a width x height image:
    ``smart_resize`` (transformers' own function) to multiples of patch_size * merge_size within
    its pixel bounds; no crop, no padding. Without ``do_resize`` the image as it is."""
    if not _get_flag(image_processor, "do_resize", True):
        return int(width), int(height)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    lo, hi = _qwen_pixel_bounds(image_processor)
    h, w = smart_resize(int(height), int(width), factor=factor, min_pixels=lo, max_pixels=hi)
    return int(w), int(h)


def qwen_box_mask(boxes: Sequence[Tuple[float, float, float, float]], width: int, height: int,
                  rows: int, cols: int) -> Tensor:
    """Pixel boxes of a width x height image -> bool [rows * cols] on the image's merged grid.

    Qwen's processor only resizes (``qwen_resized_size``: new_w x new_h, each side scaled on its
    own, so the aspect may change), which maps x to x * new_w / width and y to y * new_h / height;
    normalised by the resized picture that is x / width and y / height, computed directly (the
    scale would only add rounding). So the published normalisation by the original size is right
    for Qwen; what the geometry decides is the grid. Then the grid rule of ALGORITHMS.md step 7
    (``data.box_grid_mask``) on the rows x cols merge units, which tile the resized picture."""
    return box_grid_mask([(x1 / width, y1 / height, x2 / width, y2 / height) for x1, y1, x2, y2 in boxes],
                         rows, cols)


# --------------------------------------------------------------------------- Qwen2.5-VL adapter

class QwenTrainAdapter(_TrainAdapter):
    """Qwen2.5-VL: one image per sample, of any size: its merged grid (rows, cols) =
    (h / merge, w / merge) of ``image_grid_thw``; images of a batch may differ."""

    family = "qwen2_5_vl"

    def __init__(self, model):
        super().__init__()
        cfg = getattr(model, "config", model)
        vc = cfg.vision_config
        self.merge = int(vc.spatial_merge_size)
        self.patch = int(vc.patch_size)
        self.image_token_id = int(cfg.image_token_id)

    def _check_processor(self, ip) -> None:
        got = (int(getattr(ip, "patch_size", 0) or 0), int(getattr(ip, "merge_size", 0) or 0))
        if got != (self.patch, self.merge):
            raise ValueError(f"the image processor's patch_size / merge_size {got} differ from the model's "
                             f"({self.patch}, {self.merge})")

    # -- data
    def encode(self, processor, image, row: Row) -> dict:
        from .qwen import image_dims
        ip = processor.image_processor
        self._check_processor(ip)
        text = prompt_text(processor, row.question, self.family)
        if "<|image_pad|>" not in text:
            raise ValueError(f"line {row.line}: the prompt {text!r} holds no image placeholder <|image_pad|> "
                             "(the processor's chat template must render {'type': 'image'})")
        enc = processor(images=image, text=text, return_tensors="pt")
        ids = enc["input_ids"][0]
        grid = enc["image_grid_thw"]
        if grid.shape[0] != 1:
            raise ValueError(f"line {row.line}: the processor made {grid.shape[0]} images of one")
        (rows, cols), = image_dims(grid, self.merge)
        n = int((ids == self.image_token_id).sum())
        if n != rows * cols:
            raise ValueError(f"line {row.line}: the prompt holds {n} image tokens, the image's {rows}x{cols} merged "
                             f"grid needs {rows * cols} (does the question contain an image placeholder?)")
        made = (int(grid[0, 2]) * self.patch, int(grid[0, 1]) * self.patch)
        want = qwen_resized_size(ip, row.width, row.height)
        if made != want:
            raise ValueError(f"box geometry predicts a {want[0]}x{want[1]} picture but the processor made "
                             f"{made[0]}x{made[1]}: unsupported image processor settings")
        mask = qwen_box_mask(row.boxes, row.width, row.height, rows, cols)
        return {**self._sequence(processor, ids, row), "pixel_values": enc["pixel_values"],
                "image_grid_thw": grid[0], "box_mask": mask, "line": row.line}

    def _image_inputs(self, items: Sequence[dict]) -> dict:
        """Qwen packs the patches of all images along one axis; one grid row per image."""
        return {"pixel_values": torch.cat([it["pixel_values"] for it in items]),
                "image_grid_thw": torch.stack([it["image_grid_thw"] for it in items])}

    def _box_masks(self, items: Sequence[dict]) -> dict:
        """Masks of different lengths: padded with False to the longest, ``box_valid`` marks the
        tokens (``train.vip_losses`` reads only those, so a sample's Dice is its own)."""
        n = max(int(it["box_mask"].numel()) for it in items)
        mask = torch.zeros(len(items), n, dtype=torch.bool)
        valid = torch.zeros(len(items), n, dtype=torch.bool)
        for b, it in enumerate(items):
            mask[b, :it["box_mask"].numel()] = it["box_mask"]
            valid[b, :it["box_mask"].numel()] = True
        return {"box_mask": mask, "box_valid": valid}

    # -- the training forward
    def _inspect(self, model):
        from .qwen import inspect_qwen
        return inspect_qwen(model)

    def _vision(self, p, head, batch: dict, is_img: Tensor):
        """The merger's tokens [U, H] (all images, raster order each), the conditions (one [U, C]
        per selected block) and each image's merged grid."""
        from .qwen import image_dims, run_tower
        grid = batch["image_grid_thw"].to(is_img.device)
        dims = image_dims(grid, p.merge)
        merged, conds = run_tower(p, batch["pixel_values"].to(is_img.device), grid, head.selected_visual_layers)
        per_row = is_img.sum(1).tolist()
        if per_row != [r * c for r, c in dims]:
            raise ValueError(f"each sample needs one image: rows hold {per_row} image placeholders, the "
                             f"{len(dims)} images' merged grids {dims} need {[r * c for r, c in dims]}")
        return merged, conds, dims

    def _positions(self, p, batch: dict, emb: Tensor):
        """M-RoPE ids of the whole training sequence from the model's get_rope_index: the slot is
        text, so the glimpse gets the prompt's last position + 1 in all three rows and the answer
        counts on from there. The decoder layers take the cos/sin alone (position_ids None, as
        the model passes them), the mask the attention mask alone."""
        from .qwen import rope_positions
        ids = batch["input_ids"]
        pos3 = rope_positions(p, ids, batch["attention_mask"], batch["image_grid_thw"].to(ids.device))
        return None, p.lm.rotary_emb(emb, pos3), None

    def _vip(self, head, A: Tensor, conds, dims) -> Tensor:
        """The VIP per image on its own grid (one call per distinct grid); logits [B, max N], zero
        beyond an image's tokens."""
        out = head.predict_images(A, conds, dims)
        n = max(o.shape[0] for o in out)
        return torch.stack([F.pad(o, (0, n - o.shape[0])) for o in out])
