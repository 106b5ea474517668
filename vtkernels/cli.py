"""The ``vtk`` command: ``vtk demo`` (every pruning method on a LLaVA model, end to end) and
``vtk bench`` (the vtk ops against the reference implementations).

``vtk demo`` with no arguments needs no download: it builds a small LLaVA from a config with
random weights, a word-level tokenizer and a CLIP image processor, and uses the bundled image.
Random weights mean the generated words are noise and the kept patches follow an untrained
encoder's attention; timings, token counts, FLOPs and the mechanics are the real thing.
``--model DIR --image FILE --prompt TEXT`` runs a local checkpoint with its own processor.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

ASSET_IMAGE = Path(__file__).with_name("assets") / "demo.png"

# Small vocabulary for the embedded model: enough for a LLaVA-style prompt and readable output.
DEMO_WORDS = ("<pad> <unk> <s> </s> <image> user assistant : ? . , ! a an the is are of in on at "
              "with and to this that what where which how many picture image photo there it its "
              "house roof door window tree sun sky cloud grass sign text red green blue yellow "
              "white brown black small big left right top bottom one two three shows see i").split()

METHOD_ORDER = ("fopru_rank", "fopru_row", "vispruner", "prumerge", "prumerge_plus")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- small models

def tiny_tokenizer(words=DEMO_WORDS):
    """Word-level fast tokenizer (lower-cased, punctuation split) with ``<image>`` special."""
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
                                  additional_special_tokens=["<image>"])
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


# --------------------------------------------------------------------------- demo

def _load_local(model_dir: str, device: torch.device, dtype: Optional[torch.dtype]):
    from transformers import (AutoConfig, AutoProcessor, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration)
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if cfg.model_type not in classes:
        raise SystemExit(f"vtk demo: {model_dir} is a {cfg.model_type!r} model; "
                         "supported: llava (LLaVA-1.5), llava_next (LLaVA-NeXT)")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = classes[cfg.model_type].from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    return model.to(device).eval(), processor


def _prompt(processor, text: str) -> str:
    if "<image>" in text:
        return text
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return f"USER: <image>\n{text} ASSISTANT:"


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


def _panel(image, grid: int, kept: Optional[torch.Tensor], title: str, size: int = 240):
    """The image with pruned patches dimmed and kept ones outlined, under a title bar."""
    from PIL import Image, ImageDraw
    im = image.convert("RGB").resize((size, size), Image.BICUBIC)
    if kept is not None:
        cell = size / grid
        mask = torch.zeros(grid * grid, dtype=torch.bool)
        mask[kept.long()] = True
        shade = Image.new("RGB", im.size, (20, 20, 40))
        alpha = Image.new("L", im.size, 0)
        da = ImageDraw.Draw(alpha)
        for p in range(grid * grid):
            if not mask[p]:
                r, c = divmod(p, grid)
                da.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=185)
        im = Image.composite(shade, im, alpha)
        d = ImageDraw.Draw(im)
        for p in kept.tolist():
            r, c = divmod(int(p), grid)
            d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 220, 0))
    out = Image.new("RGB", (size, size + 22), (255, 255, 255))
    out.paste(im, (0, 22))
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
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {None: None, "float32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model:
        progress(f"loading {args.model} ...")
        model, processor = _load_local(args.model, device, dtype)
        where = args.model
    else:
        progress("building the embedded LLaVA (random weights, CLIP 224 px / 14, 256 patches) ...")
        # The language model carries most of the FLOPs, as in LLaVA-1.5-7B (about 95% there).
        model, processor = tiny_llava(text_hidden=256, text_layers=4)
        model = model.to(device=device, dtype=dtype or torch.float32)
        if device.type == "cpu":
            # Ops this small cost less than waking a thread pool; one thread also keeps the
            # timings steady on a shared machine.
            torch.set_num_threads(1)
        where = "embedded LLaVA (random weights)"
    image_path = Path(args.image) if args.image else ASSET_IMAGE
    image = Image.open(image_path).convert("RGB")
    prompt = _prompt(processor, args.prompt)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    cfg = model.config
    vc = cfg.vision_config
    grid = vc.image_size // vc.patch_size
    N = grid * grid
    keep = args.keep if args.keep is not None else min(64, max(1, N // 4))
    if not 1 <= keep <= N:
        raise SystemExit(f"vtk demo: --keep must be in [1, {N}]")
    L = inputs["input_ids"].shape[1]
    n_img = int((inputs["input_ids"] == cfg.image_token_id).sum())
    n_text = L - n_img
    crops = inputs["pixel_values"].shape[1] if inputs["pixel_values"].dim() == 5 else 1
    methods = [m for m in METHOD_ORDER if args.methods is None or m in args.methods]
    runs = [("unpruned", None, {})] + [
        (m, m, {} if m.startswith("prumerge") else {"keep": keep}) for m in methods]
    base_img = _base_image(processor, inputs["pixel_values"])
    panels = [_panel(base_img, grid, None, f"input ({N} patches)")]
    results = []
    for i, (name, method, opts) in enumerate(runs, 1):
        progress(f"[{i}/{len(runs)}] {name}: generate {args.max_new_tokens} tokens ...")
        with _maybe_pruning(vhf, model, method, opts) as handle, torch.inference_mode():
            model(**inputs, logits_to_keep=1)  # warm-up, and the selection to report
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            visual = handle.last_lengths[0] if handle else n_img
            kept = handle.last_kept[0][0].cpu() if handle else None
            # Unpruned, Hugging Face projects every crop's tokens (padding included).
            projected = handle.last_projected[0] if handle else crops * N
        new = out[0, L:]
        text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        results.append(dict(name=name, method=method, opts=opts, visual=visual, kept=kept,
                            projected=projected, text=text or " ".join(map(str, new.tolist())), times=[]))
    # Timed rounds interleave the methods, so drift (clocks, caches) does not favour any of them.
    progress(f"timing the prefill: {args.repeats} rounds over {len(runs)} configurations ...")
    for _ in range(args.repeats):
        for r in results:
            with _maybe_pruning(vhf, model, r["method"], r["opts"]), torch.inference_mode():
                r["times"].append(_time_prefill(model, inputs, device))
    rows = []
    base = results[0]
    base_time = statistics.median(base["times"])
    base_flops = None
    for r in results:
        seconds = statistics.median(r["times"])
        fl = prefill_flops(cfg, r["visual"], n_text, crops=crops, projected_tokens=r["projected"],
                           vision_layers=vision_layers_run(cfg, r["method"])).total
        base_flops = base_flops or fl
        rows.append([r["name"], f"{r['visual']}/{n_img}", f"{seconds * 1e3:.1f}",
                     f"{base_time / seconds:.2f}x", _fmt_flops(fl), f"{100 * (1 - fl / base_flops):.0f}%",
                     r["text"][:48]])
        if r["kept"] is not None:
            n = r["visual"]
            if r["method"].startswith("prumerge"):
                title = f"{r['name']}: {n} tokens ({r['kept'].numel()} merged + summary)"
            else:
                title = f"{r['name']}: {n} token{'s' if n != 1 else ''}"
            panels.append(_panel(base_img, grid, r["kept"], title))
    header = ["method", "visual tokens", "prefill ms", "speed-up", "prefill FLOPs", "fewer", "generated"]
    print(f"\n{where} on {device}, prompt {n_text} text tokens + {n_img} image tokens"
          f" ({crops} crop{'s' if crops > 1 else ''}); keep={keep} for the fixed-budget methods\n")
    print(_table(rows, header))
    print("\nprefill = one forward (vision tower, pruning, language model), median of "
          f"{args.repeats}; FLOPs from vtkernels.flops (matmuls: tower, projector, LM).")
    out_path = Path(args.out)
    _sheet(panels).save(out_path)
    print(f"kept patches: {out_path} (dimmed = pruned; PruMerge: the merge centres)")
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
    d = sub.add_parser("demo", help="prune a LLaVA prefill with every method; table and PNG")
    d.add_argument("--model", help="local LLaVA / LLaVA-NeXT checkpoint directory (default: embedded)")
    d.add_argument("--image", help=f"image file (default: the bundled {ASSET_IMAGE.name})")
    d.add_argument("--prompt", default="What is in this picture?", help="question about the image")
    d.add_argument("--keep", type=int, default=None,
                   help="visual tokens per image for fopru/vispruner (default: min(64, patches/4))")
    d.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=None)
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
