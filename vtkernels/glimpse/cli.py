"""``vtk glimpse-train``: GlimpsePrune's head trained from box annotations on a local checkpoint.

Kept here rather than in ``vtkernels/cli.py``: that file only adds the subcommand
(``add_train_parser``) and calls ``glimpse_train``.
"""
from __future__ import annotations

import argparse
import sys
import time

DESCRIPTION = """\
Train GlimpsePrune's glimpse and its visual importance predictor (VIP) on a frozen LLaVA-1.5 or
Qwen2.5-VL from box annotations (ALGORITHMS.md "GlimpsePrune", step 7). --data is a .jsonl file
of rows {"question", "answer", "image", "width", "height", "bboxs": [[x1, y1, x2, y2], ...]}
(boxes in pixels, image relative to --images). Bad rows are reported with their line numbers and
skipped. The boxes go through the processor's geometry onto the model's token grid: LLaVA-1.5's
pad / resize / centre crop onto its patch grid (24 x 24 at 336 px), Qwen2.5-VL's resize to
multiples of 28 px onto each image's merged grid (h/2 x w/2 patches). The head is written to
--out in the published format (config.json, new_modules_gp.pt), with checkpoints in
--out/checkpoint-<step>/; the evaluation (Dice and IoU of the kept tokens against the boxes, kept
ratio) is printed at the end."""


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Adds ``glimpse-train`` to an argparse subparsers object."""
    t = sub.add_parser("glimpse-train", help="train GlimpsePrune's head from box annotations (LLaVA-1.5, Qwen2.5-VL)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = t.add_argument
    a("--model", required=True,
      help="local LLaVA-1.5 or Qwen2.5-VL checkpoint directory (save_pretrained, processor included)")
    a("--data", required=True, help="training rows, .jsonl (Visual-CoT style)")
    a("--images", required=True, help="folder the rows' image paths are relative to")
    a("--out", required=True, help="output folder: the trained head, checkpoint-<step>/ subfolders")
    n = t.add_mutually_exclusive_group()
    n.add_argument("--steps", type=int, default=None, help="optimizer steps to train for")
    n.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1 unless --steps)")
    a("--lr", type=float, default=1e-4, help="AdamW peak learning rate, after 10%% warm-up, cosine to 0 (default 1e-4)")
    a("--batch-size", type=int, default=4, help="samples per micro-batch (default 4)")
    a("--grad-accum", type=int, default=4,
      help="micro-batches summed per optimizer step (default 4: effective batch 16, as published)")
    a("--max-samples", type=int, default=None, help="use only the first N good rows of --data")
    a("--seed", type=int, default=0, help="seed of the head's initialisation, the data order and the dropout")
    a("--resume", default=None,
      help="continue from a checkpoint folder (or an --out folder: its newest checkpoint), same settings")
    a("--device", default=None, help="cpu or cuda (default: cuda when present); bf16 autocast on CUDA")
    a("--max-bad-fraction", type=float, default=0.1,
      help="fail when more than this fraction of the rows read is bad (default 0.1)")
    a("--save-every", type=int, default=None, help="checkpoint every N steps (default: only at the end)")
    a("--gradient-checkpointing", action="store_true",
      help="recompute each LLM layer's activations in the backward instead of keeping them: less GPU memory "
           "for about one more forward per step, the same gradients")
    a("--reduce-layer", type=int, default=None,
      help="K, the layer after which the glimpse decides (default: the published one, else 2/3 of the depth)")
    a("--eval-data", default=None,
      help="held-out rows (.jsonl, same --images) for the final evaluation (default: the training rows)")
    a("--eval-samples", type=int, default=200, help="rows evaluated at the end, 0 to skip (default 200)")
    return t


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def glimpse_train(args) -> int:
    import torch
    from transformers import AutoConfig

    from ..cli import _load_local
    from .adapters import adapter_for
    from .data import BadDataError, GlimpseDataset
    from .head import GlimpseHead
    from .train import evaluate, train

    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg = AutoConfig.from_pretrained(args.model, local_files_only=True)
        adapter_for(cfg)  # an unsupported model fails here, before anything loads
    except (OSError, ValueError, NotImplementedError) as e:
        raise SystemExit(f"vtk glimpse-train: {e}")
    _say(f"loading {args.model} ({cfg.model_type}) ...")
    # The frozen model in bfloat16 on CUDA (the head trains in float32 under autocast), float32 on
    # CPU; its class from the config, the processor with AutoProcessor (Qwen without torchvision:
    # its tokenizer and image processor), as `vtk demo --model` loads them.
    model, processor = _load_local(args.model, device, None)
    try:
        data = GlimpseDataset.from_source(args.data, args.images, processor, model,
                                          max_bad_fraction=args.max_bad_fraction, max_samples=args.max_samples)
        held = None
        if args.eval_data and args.eval_samples > 0:
            held = GlimpseDataset.from_source(args.eval_data, args.images, processor, model,
                                              max_bad_fraction=args.max_bad_fraction,
                                              max_samples=args.eval_samples)
    except (BadDataError, ValueError, OSError) as e:
        raise SystemExit(f"vtk glimpse-train: {e}")
    _say(f"{len(data)} training samples ({data.rows_read} rows read, {len(data.bad_rows)} skipped)")
    torch.manual_seed(args.seed)
    head = GlimpseHead.for_model(model, reduce_layer=args.reduce_layer).float()
    try:
        result = train(model, head, data, steps=args.steps, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed, out=args.out,
                       save_every=args.save_every, resume=args.resume,
                       gradient_checkpointing=args.gradient_checkpointing)
    except ValueError as e:
        raise SystemExit(f"vtk glimpse-train: {e}")
    last = result.history[-1] if result.history else None
    if last:
        _say(f"trained {last['step']} steps in {result.seconds:.1f} s: loss {last['loss']:.4f} "
             f"(lm {last['lm']:.4f}, dice {last['dice']:.4f}, bce {last['bce']:.4f})")
    print(f"head: {args.out} (config.json, new_modules_gp.pt); last checkpoint: {result.checkpoint}")
    if args.eval_samples > 0:
        which = held if held is not None else data
        name = args.eval_data if held is not None else f"{args.data} (training rows)"
        ev = evaluate(model, head, which, max_samples=args.eval_samples, batch_size=args.batch_size)
        print(f"evaluation on {ev['samples']} rows of {name}: dice {ev['dice']:.4f}  iou {ev['iou']:.4f}  "
              f"kept ratio {ev['kept_ratio']:.4f}  (threshold {head.reduce_threshold}, "
              f"min_keep {head.min_remain_num}, max_ratio {head.max_remain_ratio})")
    _say(f"done in {time.perf_counter() - t0:.1f} s")
    return 0

