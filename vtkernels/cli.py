"""The ``vtk`` command: ``vtk demo`` (every pruning method on a VLM, end to end) and
``vtk bench`` (the vtk ops against the reference implementations).

``vtk demo`` with no arguments needs no download: it builds a small LLaVA from a config with
random weights, a word-level tokenizer and a CLIP image processor, and uses the bundled image;
``--family qwen2_5_vl`` / ``qwen3_vl`` builds a small model of that family instead.
Random weights mean the generated words are noise and the kept patches follow an untrained
encoder's attention; timings, token counts, FLOPs and the mechanics are the real thing.
``--model DIR --image FILE --prompt TEXT`` runs a local checkpoint with its own processor.
GlimpsePrune (LLaVA-1.5, Qwen2.5-VL) runs with an untrained head, seeded, and says so (its kept set is
arbitrary), or with a trained one from ``--glimpse-head DIR``; other models skip it and say why.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional

import torch

ASSET_IMAGE = Path(__file__).with_name("assets") / "demo.png"

# Small vocabulary for the embedded model: enough for a LLaVA-style prompt and readable output.
DEMO_WORDS = tuple(("<pad> <unk> <s> </s> <image> user assistant : ? . , ! a an the is are of in on at "
               "with and to this that what where which how many picture image photo there it its "
               "house roof door window tree sun sky cloud grass sign text red green blue yellow "
               "white brown black small big left right top bottom one two three shows see i").split())

METHOD_ORDER = ("fopru_rank", "fopru_row", "vispruner", "prumerge", "prumerge_plus")
GLIMPSE = "glimpse"  # the learned method, after the training-free ones
GLIMPSE_SEED = 0  # the untrained head's initialisation: the demo is deterministic


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- small models

def tiny_tokenizer(words=DEMO_WORDS, special=("<image>",)):
    """Word-level fast tokenizer (lower-cased, punctuation split) with ``special`` tokens kept
    whole (they must be in ``words``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=list(special))
    tok.padding_side = "left"  # what generate expects for batches
    return tok


def tiny_llava(kind: str = "llava", *, image_size: int = 224, patch_size: int = 14,
               vision_hidden: int = 64, vision_layers: int = 4, vision_heads: int = 4,
               text_hidden: int = 128, text_layers: int = 2, text_heads: int = 4,
               kv_heads: int = 2, grid_pinpoints=None, seed: int = 0):
    """(model, processor): a LLaVA-1.5 (``kind="llava"``) or LLaVA-NeXT (``"llava_next"``) with
    random weights, built offline from configs, and a processor that matches it."""
    from transformers import CLIPVisionConfig, LlamaConfig
    tok = tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=int(2.75 * text_hidden),
                       num_hidden_layers=text_layers, num_attention_heads=text_heads,
                       num_key_value_heads=kv_heads, vocab_size=len(tok),
                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    common = dict(tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1)
    if kind == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
        cls = LlavaForConditionalGeneration
        processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size=crop), **common)
    elif kind == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
        s = image_size
        pins = grid_pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                                 image_grid_pinpoints=pins)
        cls = LlavaNextForConditionalGeneration
        processor = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(
            size=size, crop_size=crop, image_grid_pinpoints=pins), **common)
    else:
        raise ValueError(f"kind must be 'llava' or 'llava_next', got {kind!r}")
    torch.manual_seed(seed)
    model = cls(config).eval()
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return model, processor


QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
QWEN_FLOPS = ("qwen2_5_vl", "qwen3_vl")  # families vtkernels.flops counts


class QwenPlaceholderProcessor:
    """Text + images for a Qwen-VL model, as its processor prepares them, without the video
    processor that ``Qwen2_5_VLProcessor`` insists on (it needs torchvision): the image
    processor's ``pixel_values`` and ``image_grid_thw``, every ``<|image_pad|>`` expanded to its
    image's merge units (``t h w / merge^2`` tokens), ``mm_token_type_ids`` (0 text, 1 image,
    2 video). ``video_grid_thw`` expands ``<|video_pad|>`` the same way (the caller brings
    ``pixel_values_videos``); with ``frames_apart`` (Qwen3-VL, Qwen3.5) each temporal patch becomes
    its own ``<|vision_start|>`` ... ``<|vision_end|>`` block, as their processors lay videos out
    (without the timestamp text between the blocks)."""

    def __init__(self, tokenizer, image_processor, merge_size: int = 2, frames_apart: bool = False):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = merge_size
        self.frames_apart = frames_apart
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")

    def _expand(self, texts, token, grids):
        it = iter(grids.tolist() if grids is not None else [])
        out = []
        for t in texts:
            pieces = t.split(token)
            s = pieces[0]
            for rest in pieces[1:]:
                try:
                    g = next(it)
                except StopIteration:
                    raise ValueError(f"more {token} placeholders than grids") from None
                per_frame = token * (g[1] * g[2] // self.merge_size ** 2)
                if token == "<|video_pad|>" and self.frames_apart:
                    s += "".join(f"<|vision_start|>{per_frame}<|vision_end|>" for _ in range(g[0])) + rest
                else:
                    s += per_frame * g[0] + rest
            out.append(s)
        if next(it, None) is not None:
            raise ValueError(f"fewer {token} placeholders than grids")
        return out

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True, video_grid_thw=None, **_):
        from transformers import BatchFeature
        texts = [text] if isinstance(text, str) else list(text)
        data = {}
        if images is not None:
            px = self.image_processor(images=images, return_tensors="pt")
            data["pixel_values"], data["image_grid_thw"] = px["pixel_values"], px["image_grid_thw"]
            texts = self._expand(texts, "<|image_pad|>", px["image_grid_thw"])
        if video_grid_thw is not None:
            texts = self._expand(texts, "<|video_pad|>", video_grid_thw)
            data["video_grid_thw"] = video_grid_thw
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding)
        ids = enc["input_ids"]
        data["input_ids"], data["attention_mask"] = ids, enc["attention_mask"]
        data["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return BatchFeature(data)


def tiny_qwen(family: str = "qwen2_5_vl", *, vision_hidden: int = 32, vision_depth: int = 4,
              vision_heads: int = 4, fullatt_block_indexes=None, window_size=None, deepstack=None,
              text_hidden: int = 64, text_layers: int = 2, text_heads: int = 4, kv_heads: int = 2,
              min_pixels: int = 4 * 28 * 28, max_pixels: int = 64 * 28 * 28, seed: int = 0):
    """(model, processor): a Qwen2.5-VL (``family="qwen2_5_vl"``), Qwen3-VL (``"qwen3_vl"``) or
    Qwen3.5 (``"qwen3_5"``) with random weights, built offline from configs, and a
    ``QwenPlaceholderProcessor`` for it. Qwen2.5-VL: patches of 14 px, window attention in every
    block but ``fullatt_block_indexes`` (default: the middle one and the last), windows of 2 x 2
    merge units (``window_size`` px) so small images hold several; Qwen3-VL / Qwen3.5: patches of
    16 px; Qwen3-VL's deepstack features from blocks ``deepstack`` (default: the first
    min(2, text_layers)). Image sizes are bounded by ``min_pixels`` / ``max_pixels`` (in pixels,
    as the Qwen image processor takes them)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if family not in QWEN_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(QWEN_FAMILIES)}, got {family!r}")
    tok = tiny_tokenizer(DEMO_WORDS + QWEN_SPECIAL, special=QWEN_SPECIAL)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = text_hidden // text_heads
    if head_dim % 4:
        raise ValueError("text_hidden / text_heads must be a multiple of 4 (M-RoPE sections)")
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    patch = 14 if family == "qwen2_5_vl" else 16
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_heads, out_hidden_size=text_hidden, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2)
    text = dict(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                num_attention_heads=text_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                vocab_size=len(tok), max_position_embeddings=4096, rope_parameters=rope,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as cls
        vision["fullatt_block_indexes"] = list(fullatt_block_indexes if fullatt_block_indexes is not None
                                               else sorted({vision_depth // 2 - 1, vision_depth - 1}))
        vision["window_size"] = window_size or 2 * 2 * patch
        vision["hidden_act"] = "silu"
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config, Qwen3VLForConditionalGeneration as cls
        vision["num_position_embeddings"] = 64  # an 8 x 8 learned grid, resampled per image
        vision["deepstack_visual_indexes"] = list(deepstack if deepstack is not None
                                                  else range(min(2, text_layers, vision_depth)))
        rope["mrope_interleaved"] = True
    else:
        from transformers import Qwen3_5Config as Config, Qwen3_5ForConditionalGeneration as cls
        vision["num_position_embeddings"] = 64
        rope["partial_rotary_factor"] = 1.0
        rope["mrope_interleaved"] = True
        # Gated delta-net (linear attention) layers, then a full-attention one, as Qwen3.5 mixes them.
        text.update(layer_types=["linear_attention"] * (text_layers - 1) + ["full_attention"],
                    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=head_dim,
                    linear_value_head_dim=head_dim, linear_conv_kernel_dim=2)
    config = Config(vision_config=vision, text_config=text, **tokens)
    torch.manual_seed(seed)
    model = cls(config).eval()
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch,
                                               merge_size=2, temporal_patch_size=2)
    return model, QwenPlaceholderProcessor(tok, image_processor, frames_apart=family != "qwen2_5_vl")


# --------------------------------------------------------------------------- demo

_LOCAL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
                  "qwen3_5": "Qwen3_5ForConditionalGeneration"}


def _load_local(model_dir: str, device: torch.device, dtype: Optional[torch.dtype]):
    """A local checkpoint, its family read from its config's model_type."""
    import transformers
    from transformers import AutoConfig, AutoProcessor
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if cfg.model_type not in _LOCAL_CLASSES:
        raise SystemExit(f"vtk demo: {model_dir} is a {cfg.model_type!r} model; supported: "
                         + ", ".join(_LOCAL_CLASSES))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cls = getattr(transformers, _LOCAL_CLASSES[cfg.model_type])
    model = cls.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure: fall back where we can, else say why
        if cfg.model_type not in QWEN_FAMILIES:
            raise
        # Qwen's processor insists on its video processor, which needs torchvision; images only
        # need the tokenizer and the image processor.
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        progress(f"AutoProcessor failed ({type(e).__name__}: {e}); using the tokenizer and image processor")
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        tok.padding_side = "left"
        ip = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        processor = QwenPlaceholderProcessor(tok, ip, merge_size=cfg.vision_config.spatial_merge_size,
                                             frames_apart=cfg.model_type != "qwen2_5_vl")
    return model.to(device).eval(), processor


def _prompt(processor, text: str, qwen: bool) -> str:
    """The text as is when it holds the image placeholder, else the chat prompt GlimpsePrune's
    training builds (the chat template, else the family's plain prompt)."""
    from .glimpse.adapters import QWEN_IMAGE, prompt_text
    placeholder = QWEN_IMAGE if qwen else "<image>"
    if placeholder in text or (qwen and "<|image_pad|>" in text):
        return text
    return prompt_text(processor, text, "qwen" if qwen else "llava")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_prefill(model, inputs, device) -> float:
    """Seconds of one prefill: vision tower, pruning, language model (last logits only)."""
    _sync(device)
    t0 = time.perf_counter()
    model(**inputs, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t0


def _maybe_pruning(vhf, model, method, opts):
    return vhf.pruning(model, method, **opts) if method else contextlib.nullcontext()


def _glimpse_setup(vhf, model, head_dir: Optional[str], threshold: Optional[float]):
    """The glimpse row: (options for apply_pruning, table label, panel label, note), or
    (None, reason) when the model cannot run GlimpsePrune and no head was asked for.

    Without ``head_dir``: an untrained head (GlimpseHead.for_model, seeded), labelled as such.
    With it: that checkpoint (published format), checked against the model; any problem with it,
    or a model GlimpsePrune does not run on, is a SystemExit naming the directory."""
    from .glimpse import GlimpseHead
    if head_dir is not None:
        try:
            head = GlimpseHead.from_pretrained(head_dir, model=model)
        except (ValueError, OSError) as e:
            # ValueError: a missing or unreadable file, a bad config, a head for another model,
            # keys that do not fit (from_pretrained names the file and the problem).
            raise SystemExit(f"vtk demo: --glimpse-head {head_dir}: {e}") from None
        name = Path(head_dir).resolve().name or str(head_dir)
        short = name if len(name) <= 20 else name[:17] + "..."
        label, panel = f"glimpse (head: {name})", f"glimpse (head: {short})"
        what = f"the GlimpseHead checkpoint {head_dir}"
    else:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(GLIMPSE_SEED)
                head = GlimpseHead.for_model(model)
        except ValueError as e:
            return None, str(e)
        label, panel = "glimpse (untrained head)", "glimpse (untrained head)"
        what = (f"an UNTRAINED head (GlimpseHead.for_model, seed {GLIMPSE_SEED}): its kept set is arbitrary "
                "(an untrained VIP keeps nearly all tokens or almost none); --glimpse-head DIR loads a "
                "trained one")
    opts = {"head": head}
    if threshold is not None:
        opts["threshold"] = threshold
    try:  # the model and the options, checked once before anything runs
        vhf.apply_pruning(model, GLIMPSE, **opts).remove()
    except ValueError as e:
        if head_dir is not None:
            raise SystemExit(f"vtk demo: --glimpse-head {head_dir}: {e}") from None
        return None, str(e)
    from .glimpse.flops import language_saving_bound
    L = model.config.text_config.num_hidden_layers
    K = head.reduce_layer
    thr = head.reduce_threshold if threshold is None else threshold
    note = (f"{label}: {what}; keeps tokens with sigmoid > {thr:g} (--glimpse-threshold). It prunes "
            f"inside the LLM after layer K = {K} of {L}: layers 0..{K} run in full, so at most "
            f"{100 * language_saving_bound(L, K):.0f}% of the LLM's layers get the shorter sequence, and "
            "its VIP head adds its own FLOPs (vtkernels.glimpse.prefill_flops); the saving it is after "
            "is in decoding.")
    return opts, label, panel, note


def _base_image(processor, pixel_values: torch.Tensor):
    """The picture the vision tower saw (the base crop), as a PIL image."""
    from PIL import Image
    ip = processor.image_processor
    px = pixel_values[0]
    if px.dim() == 4:  # LLaVA-NeXT: crops; the first is the whole image
        px = px[0]
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
    arr = ((px.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _panel(image, grid, kept: Optional[torch.Tensor], title: str, size: int = 240):
    """The image with pruned cells dimmed and kept ones outlined, under a title bar. ``grid`` is
    (rows, cols) of the token grid (an int: square)."""
    from PIL import Image, ImageDraw
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    scale = size / max(rows, cols)
    w, h = max(1, round(cols * scale)), max(1, round(rows * scale))
    im = image.convert("RGB").resize((w, h), Image.BICUBIC)
    if kept is not None:
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[kept.long()] = True
        shade = Image.new("RGB", im.size, (20, 20, 40))
        alpha = Image.new("L", im.size, 0)
        da = ImageDraw.Draw(alpha)
        for p in range(rows * cols):
            if not mask[p]:
                r, c = divmod(p, cols)
                da.rectangle([c * scale, r * scale, (c + 1) * scale - 1, (r + 1) * scale - 1], fill=185)
        im = Image.composite(shade, im, alpha)
        d = ImageDraw.Draw(im)
        for p in kept.tolist():
            r, c = divmod(int(p), cols)
            d.rectangle([c * scale, r * scale, (c + 1) * scale - 1, (r + 1) * scale - 1], outline=(255, 220, 0))
    out = Image.new("RGB", (size, size + 22), (255, 255, 255))
    out.paste(im, ((size - w) // 2, 22 + (size - h) // 2))
    ImageDraw.Draw(out).text((4, 5), title, fill=(0, 0, 0))
    return out


def _sheet(panels, columns: int = 3):
    from PIL import Image
    w, h = panels[0].size
    rows = (len(panels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w + (columns + 1) * 6, rows * h + (rows + 1) * 6), (235, 235, 235))
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        sheet.paste(p, (6 + c * (w + 6), 6 + r * (h + 6)))
    return sheet


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt_flops(f: float) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOPs"


def demo(args) -> int:
    threads = torch.get_num_threads()
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args) -> int:
    from PIL import Image
    from . import hf as vhf
    from .flops import prefill_flops, vision_layers_run
    from .glimpse.flops import prefill_flops as glimpse_flops
    t_start = time.perf_counter()
    want_glimpse = args.methods is None or GLIMPSE in args.methods
    glimpse_head = args.glimpse_head
    glimpse_threshold = args.glimpse_threshold
    if not want_glimpse and (glimpse_head is not None or glimpse_threshold is not None):
        raise SystemExit("vtk demo: --glimpse-head / --glimpse-threshold need the glimpse method: "
                         "add glimpse to --methods")
    if glimpse_threshold is not None and not 0.0 < glimpse_threshold < 1.0:
        raise SystemExit(f"vtk demo: --glimpse-threshold must be in (0, 1), got {glimpse_threshold:g}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {None: None, "float32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model:
        progress(f"loading {args.model} ...")
        model, processor = _load_local(args.model, device, dtype)
        where = args.model
    else:
        if args.family == "llava":
            progress("building the embedded LLaVA (random weights, CLIP 224 px / 14, 256 patches) ...")
            # The language model carries most of the FLOPs, as in LLaVA-1.5-7B (about 95% there).
            model, processor = tiny_llava(text_hidden=256, text_layers=4)
            where = "embedded LLaVA (random weights)"
        else:
            name = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}[args.family]
            progress(f"building the embedded {name} (random weights, up to 256 merge units per image) ...")
            # The tower at the picture's size and aspect ratio, up to 256 merge units (1024 patches);
            # the language model carries most of the FLOPs, as at 7B.
            p = 14 if args.family == "qwen2_5_vl" else 16
            model, processor = tiny_qwen(args.family, vision_hidden=64, vision_depth=4, text_hidden=512,
                                         text_layers=4, min_pixels=64 * (2 * p) ** 2,
                                         max_pixels=256 * (2 * p) ** 2)
            where = f"embedded {name} (random weights)"
        model = model.to(device=device, dtype=dtype or torch.float32)
        if device.type == "cpu":
            # Ops this small cost less than waking a thread pool; one thread also keeps the
            # timings steady on a shared machine.
            torch.set_num_threads(1)
    cfg = model.config
    qwen = cfg.model_type in QWEN_FAMILIES
    image_path = Path(args.image) if args.image else ASSET_IMAGE
    image = Image.open(image_path).convert("RGB")
    prompt = _prompt(processor, args.prompt, qwen)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    vc = cfg.vision_config
    if qwen:
        # One image: its merged grid (h/2 x w/2); keep counts merge units, the tower runs in full.
        _, gh, gw = (inputs["image_grid_thw"][0] // torch.tensor([1, vc.spatial_merge_size, vc.spatial_merge_size],
                                                                 device=inputs["image_grid_thw"].device)).tolist()
        grid, N, crops, unit = (gh, gw), gh * gw, 1, "merge units"
        layout = f"a {gh} x {gw} grid of merge units"
        base_img = image
    else:
        g = vc.image_size // vc.patch_size
        grid, N, unit = g, g * g, "patches"
        crops = inputs["pixel_values"].shape[1] if inputs["pixel_values"].dim() == 5 else 1
        base_img = _base_image(processor, inputs["pixel_values"])
        layout = f"{crops} crop{'s' if crops > 1 else ''}"
    keep = args.keep if args.keep is not None else min(64, max(1, N // 4))
    if not 1 <= keep <= N:
        raise SystemExit(f"vtk demo: --keep must be in [1, {N}]")
    L = inputs["input_ids"].shape[1]
    n_img = int((inputs["input_ids"] == cfg.image_token_id).sum())
    n_text = L - n_img
    methods = [m for m in METHOD_ORDER if args.methods is None or m in args.methods]
    # (table label, method, options, panel label)
    runs = [("unpruned", None, {}, None)] + [
        (m, m, {} if m.startswith("prumerge") else {"keep": keep}, m) for m in methods]
    notes = []
    if want_glimpse:
        setup = _glimpse_setup(vhf, model, glimpse_head, glimpse_threshold)
        if setup[0] is None:
            notes.append(f"glimpse: skipped ({setup[1]})")
            progress(notes[-1])
        else:
            g_opts, g_label, g_panel, g_note = setup
            runs.append((g_label, GLIMPSE, g_opts, g_panel))
            notes.append(g_note)
    panels = [_panel(base_img, grid, None, f"input ({N} {unit})")]
    results = []
    for i, (name, method, opts, panel) in enumerate(runs, 1):
        progress(f"[{i}/{len(runs)}] {name}: generate {args.max_new_tokens} tokens ...")
        with _maybe_pruning(vhf, model, method, opts) as handle, torch.inference_mode():
            model(**inputs, logits_to_keep=1)  # warm-up, and the selection to report
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            visual = handle.last_lengths[0] if handle else n_img
            kept = handle.last_kept[0][0].cpu() if handle else None
            # Unpruned, Hugging Face projects every crop's tokens (padding included); GlimpsePrune
            # projects every image token (it prunes inside the LLM).
            projected = handle.last_projected[0] if handle and method != GLIMPSE else crops * N
        new = out[0, L:]
        text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        results.append(dict(name=name, method=method, opts=opts, panel=panel, visual=visual, kept=kept,
                            projected=projected, text=text or " ".join(map(str, new.tolist())), times=[]))
    # Timed rounds interleave the methods, so drift (clocks, caches) does not favour any of them.
    progress(f"timing the prefill: {args.repeats} rounds over {len(runs)} configurations ...")
    for _ in range(args.repeats):
        for r in results:
            with _maybe_pruning(vhf, model, r["method"], r["opts"]), torch.inference_mode():
                r["times"].append(_time_prefill(model, inputs, device))

    def flops_of(r):
        if r["method"] == GLIMPSE:  # layers 0..K in full, the VIP, the glimpse
            grids = inputs["image_grid_thw"] if qwen else None
            return glimpse_flops(model, n_text, n_img, r["visual"], head=r["opts"]["head"], grids=grids).total
        if qwen:
            if cfg.model_type not in QWEN_FLOPS:
                return None  # Qwen3.5's linear-attention layers are not counted
            return prefill_flops(cfg, r["visual"], n_text, grids=inputs["image_grid_thw"]).total
        return prefill_flops(cfg, r["visual"], n_text, crops=crops, projected_tokens=r["projected"],
                             vision_layers=vision_layers_run(cfg, r["method"])).total

    rows = []
    base = results[0]
    base_time = statistics.median(base["times"])
    base_flops = None
    for r in results:
        seconds = statistics.median(r["times"])
        fl = flops_of(r)
        base_flops = base_flops or fl
        rows.append([r["name"], f"{r['visual']}/{n_img}", f"{seconds * 1e3:.1f}",
                     f"{base_time / seconds:.2f}x", "n/a" if fl is None else _fmt_flops(fl),
                     "n/a" if fl is None else f"{100 * (1 - fl / base_flops):.0f}%", r["text"][:48]])
        if r["kept"] is not None:
            n = r["visual"]
            if r["method"].startswith("prumerge"):
                title = f"{r['panel']}: {n} tokens ({r['kept'].numel()} merged + summary)"
            else:
                title = f"{r['panel']}: {n} token{'s' if n != 1 else ''}"
            panels.append(_panel(base_img, grid, r["kept"], title))
    header = ["method", "visual tokens", "prefill ms", "speed-up", "prefill FLOPs", "fewer", "generated"]
    print(f"\n{where} on {device}, prompt {n_text} text tokens + {n_img} image tokens"
          f" ({layout}); keep={keep} for the fixed-budget methods\n")
    print(_table(rows, header))
    print("\nprefill = one forward (vision tower, pruning, language model), median of "
          f"{args.repeats}; FLOPs from vtkernels.flops (matmuls: tower, projector, LM).")
    for note in notes:
        print(textwrap.fill(note, width=100, subsequent_indent="  ", break_long_words=False,
                            break_on_hyphens=False))
    out_path = Path(args.out)
    _sheet(panels).save(out_path)
    print(f"kept {unit}: {out_path} (dimmed = pruned; PruMerge: the merge centres)")
    progress(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


# --------------------------------------------------------------------------- bench

def _median_ms(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench(args) -> int:
    from . import ops, reference
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    B = args.batch
    T, C, H = (577, 1024, 16) if not args.small else (65, 64, 4)
    N = T - 1
    keep = min(64, N // 4)
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, x = rnd(B, T, C), rnd(B, T, C), rnd(B, N, C)
    scores = ops.cls_attention(q, k, H)
    idx = ops.topk_indices(scores, keep)
    cases = [
        ("cls_attention", (q, k, H), f"q,k [{B},{T},{C}] h={H}"),
        ("attention_received", (q, k, H), f"q,k [{B},{T},{C}] h={H}"),
        ("fopru_significance", (q, k, H), f"q,k [{B},{T},{C}] h={H}"),
        ("topk_indices", (scores, keep), f"scores [{B},{N}] k={keep}"),
        ("gather_tokens", (x, idx), f"x [{B},{N},{C}] k={keep}"),
        ("fopru_select", (x, scores, keep, "rank"), f"x [{B},{N},{C}] rank keep={keep}"),
        ("fopru_select", (x, scores, keep, "row"), f"x [{B},{N},{C}] row keep={keep}"),
        ("vispruner_select", (x, scores, keep), f"x [{B},{N},{C}] keep={keep}"),
        ("prumerge", (x, k[:, 1:], ops.cls_attention(q, k, 1)), f"x,keys [{B},{N},{C}]"),
    ]
    rows = []
    progress(f"vtk bench on {device}, {dtype}, {args.repeats} timed runs per case ...")
    for name, a, desc in cases:
        if not hasattr(ops, name) or not hasattr(reference, name):
            continue
        vtk_ms = _median_ms(lambda: getattr(ops, name)(*a), device, args.repeats)
        ref_ms = _median_ms(lambda: getattr(reference, name)(*a), device, args.repeats)
        rows.append([name, desc, f"{vtk_ms:.3f}", f"{ref_ms:.3f}", f"{ref_ms / vtk_ms:.1f}x"])
        progress(f"  {name}: {vtk_ms:.3f} ms")
    print(_table(rows, ["op", "shape", "vtk ms", "reference ms", "speed-up"]))
    print(f"\nmedian of {args.repeats} after one warm-up; reference = vtkernels.reference "
          "(plain PyTorch, attention maps materialised).")
    return 0


# --------------------------------------------------------------------------- entry point

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtk", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prune a VLM prefill with every method; table and PNG")
    d.add_argument("--model", help="local checkpoint directory (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, "
                                   "Qwen3.5; the family is read from its config; default: embedded)")
    d.add_argument("--family", default="llava", choices=["llava", "qwen2_5_vl", "qwen3_vl"],
                   help="the embedded model's family (without --model)")
    d.add_argument("--image", help=f"image file (default: the bundled {ASSET_IMAGE.name})")
    d.add_argument("--prompt", default="What is in this picture?", help="question about the image")
    d.add_argument("--keep", type=int, default=None,
                   help="visual tokens per image for fopru/vispruner, merge units on Qwen "
                        "(default: min(64, tokens/4))")
    d.add_argument("--methods", nargs="+", choices=METHOD_ORDER + (GLIMPSE,), default=None,
                   help="methods to run (default: all; glimpse runs on LLaVA-1.5 and Qwen2.5-VL, others skip it)")
    d.add_argument("--glimpse-head", metavar="DIR", default=None,
                   help="a trained GlimpsePrune head (published format: config.json + new_modules_gp.pt) "
                        "for the glimpse row (default: an untrained head, labelled as such)")
    d.add_argument("--glimpse-threshold", type=float, default=None,
                   help="GlimpsePrune's keep threshold on sigmoid(logit), in (0, 1) (default: the head's, 0.5)")
    d.add_argument("--max-new-tokens", type=int, default=12)
    d.add_argument("--repeats", type=int, default=7, help="timed prefills per method")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    d.add_argument("--dtype", default=None, choices=["float32", "float64", "bfloat16", "float16"])
    d.add_argument("--out", default="vtk_demo.png", help="PNG of the kept patches")
    b = sub.add_parser("bench", help="vtk ops against the reference implementations")
    b.add_argument("--device", default=None)
    b.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"])
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--small", action="store_true", help="tiny shapes (a quick check)")
    from .glimpse.cli import add_train_parser  # the subcommand lives with GlimpsePrune's training
    add_train_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "glimpse-train":
        from .glimpse.cli import glimpse_train
        return glimpse_train(args)
    return {"demo": demo, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
