"""GlimpsePrune training (ALGORITHMS.md "GlimpsePrune", step 7) and the evaluation of its kept set.

    from vtkernels.glimpse import GlimpseHead, GlimpseDataset, train, evaluate
    data = GlimpseDataset.from_source("train.jsonl", "images/", processor, model)
    head = GlimpseHead.for_model(model)
    result = train(model, head, data, steps=1000, batch_size=4, grad_accum=4, out="run/")
    print(evaluate(model, head, held_out))      # mean Dice, IoU, kept ratio

The LLM and the vision tower are frozen (their weights come out bit-identical); E, le_proj,
le_norm and the VIP learn from Dice(sigmoid(logits), box mask) (eps 1e-6, per sample)
+ 0.1 BCE-with-logits + the LM cross-entropy on the answer, the glimpse inserted before the
answer's first token (``adapters.py`` holds that forward).

The loop is written here, about a hundred lines, on library parts: ``torch.optim.AdamW``,
transformers' ``get_cosine_schedule_with_warmup``, ``torch.autocast``, tqdm for the bar. Why not
the transformers Trainer or accelerate: the model is frozen and only a small head learns, through
a forward that is not ``model(**batch)``; the checkpoint must be the published head format, not
the model's weights; and exact resume needs the data order and the dropout masks to be a function
of (seed, step) alone. Here the order is a seeded permutation per epoch and the masks come from a
generator whose state the checkpoint holds, so a resumed run reproduces the uninterrupted one bit
for bit, with nothing to wrap or skip. What the libraries would add, multi-GPU data parallelism,
is not needed for a head trained on 20K samples in one epoch.

Checkpoints (``out/checkpoint-<step>/``): the head in the published format (config.json,
new_modules_gp.pt) plus trainer_state.pt (optimizer, scheduler, generator, the loss history and
the run's settings) and trainer_state.json (the same history, readable). Each is written into a
temporary directory and renamed into place, so a crash leaves the previous checkpoint whole. The
final head is also written to ``out/`` itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import as_dataset
from .head import CHECKPOINT_FILE, CONFIG_FILE, GlimpseHead
from .infer import apply_glimpse

__all__ = ["train", "evaluate", "TrainResult", "vip_losses", "latest_checkpoint", "STATE_FILE"]

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
DICE_EPS = 1e-6
BCE_WEIGHT = 0.1
# Settings a resumed run must share with the run it continues: any of them changes the loss curve.
_RESUME_KEYS = ("total_steps", "batch_size", "grad_accum", "seed", "samples", "data", "lr", "warmup_steps",
                "weight_decay", "max_grad_norm", "glimpse_dropout")


def vip_losses(logits: torch.Tensor, mask: torch.Tensor, valid: Optional[torch.Tensor] = None):
    """(Dice, BCE) of VIP logits [B, N] against box masks [B, N]: Dice = 1 - (2 sum(p m) + eps) /
    (sum p + sum m + eps) per sample with p = sigmoid(logits), eps 1e-6, averaged over samples;
    BCE-with-logits averaged over tokens and samples.

    ``valid`` [B, N] (images of different sizes, padded to the longest): only those entries are
    tokens; each sample's Dice and mean BCE are over its own tokens, then averaged over samples,
    so a padded batch's losses are the mean of its samples' losses alone."""
    if valid is None:
        m = mask.to(logits.dtype)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * m).sum(1) + DICE_EPS) / (p.sum(1) + m.sum(1) + DICE_EPS)
        return dice.mean(), F.binary_cross_entropy_with_logits(logits, m)
    if valid.shape != logits.shape or mask.shape != logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, mask {tuple(mask.shape)} and valid {tuple(valid.shape)} "
                         "must have one shape")
    v = valid.to(logits.dtype)
    m = mask.to(logits.dtype) * v
    p = torch.sigmoid(logits) * v
    dice = 1 - (2 * (p * m).sum(1) + DICE_EPS) / (p.sum(1) + m.sum(1) + DICE_EPS)
    bce = (F.binary_cross_entropy_with_logits(logits, m, reduction="none") * v).sum(1) / v.sum(1)
    return dice.mean(), bce.mean()


@dataclass
class TrainResult:
    """``history``: one dict per optimizer step (step, loss, lm, dice, bce, lr), from step 1 on,
    including the steps a resumed run inherited; ``checkpoint``: the last one written, or None."""
    history: List[Dict[str, float]] = field(default_factory=list)
    checkpoint: Optional[str] = None
    seconds: float = 0.0


class _Order:
    """Sample c of the run (c = 0, 1, ...) is permutation(epoch c // n)[c % n], each epoch's
    permutation seeded by (seed, epoch): the order is a function of the step, never of state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, c: int) -> int:
        e = c // self.n
        if e not in self._perms:
            self._perms = {e: np.random.default_rng([self.seed, e]).permutation(self.n)}
        return int(self._perms[e][c % self.n])


def latest_checkpoint(directory) -> Optional[str]:
    """The checkpoint-<step> folder with the highest step under ``directory``, or None."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    steps = []
    for name in os.listdir(directory):
        if name.startswith("checkpoint-") and name[11:].isdigit() \
                and os.path.isfile(os.path.join(directory, name, STATE_FILE)):
            steps.append(int(name[11:]))
    return os.path.join(directory, f"checkpoint-{max(steps)}") if steps else None


def _atomic_dir(final: str, write) -> None:
    """write(tmp) fills a temporary sibling of ``final``, which then replaces ``final``."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.exists(final):  # a rerun over an old folder: the old one goes only now
            old = tmp + ".old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_head_files(head: GlimpseHead, directory: str) -> None:
    """The final head straight into ``directory`` (which also holds the checkpoints): each file
    written next to its place and renamed over it."""
    tmp = os.path.join(directory, f".tmp-head-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        head.save_pretrained(tmp)
        for name in (CONFIG_FILE, CHECKPOINT_FILE):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


class _Progress:
    """tqdm on stderr when installed, else a plain line every ``every`` steps."""

    def __init__(self, total: int, start: int, enabled: bool, stream: IO[str]):
        self.bar, self.stream, self.enabled = None, stream, enabled
        self.every = max(1, total // 20)
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=start, desc="glimpse-train", file=stream, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, rec: dict, total: int) -> None:
        if not self.enabled:
            return
        text = {k: f"{rec[k]:.4f}" for k in ("loss", "lm", "dice", "bce")}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif rec["step"] % self.every == 0 or rec["step"] == total:
            print(f"glimpse-train step {rec['step']}/{total} " + " ".join(f"{k} {v}" for k, v in text.items())
                  + f" lr {rec['lr']:.2e}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(model, head: GlimpseHead, data, *, steps: Optional[int] = None, epochs: Optional[float] = None,
          lr: float = 1e-4, batch_size: int = 1, grad_accum: int = 1, warmup_ratio: float = 0.1,
          weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0, glimpse_dropout: float = 0.1,
          seed: int = 0, out=None, save_every: Optional[int] = None, keep_last: Optional[int] = 2,
          resume=None, bf16: Optional[bool] = None, gradient_checkpointing: bool = False, progress: bool = True,
          stream: Optional[IO[str]] = None, processor=None, images=None, **data_options) -> TrainResult:
    """Trains ``head`` for ``model`` (frozen) on ``data``; returns a TrainResult.

    data: a GlimpseDataset, or a .jsonl path / list of rows with ``processor=`` and ``images=``
    (``data_options``: max_bad_fraction, max_samples, report). steps: optimizer steps; or epochs
    (default 1): ceil(epochs * len(data) / (batch_size * grad_accum)) steps. lr: AdamW's peak,
    reached after ``warmup_ratio`` of the steps, then cosine to 0. Each optimizer step sums
    ``grad_accum`` micro-batches of ``batch_size`` samples. bf16: autocast to bfloat16 (default:
    on CUDA; the CPU computes in the model's dtype). gradient_checkpointing: recompute each LLM
    layer's activations in the backward instead of keeping them (less memory, about one more
    forward of time; the same gradients). progress: a bar with the losses on ``stream``
    (default sys.stderr). out: where checkpoints go (every
    ``save_every`` steps and at the end; only the newest ``keep_last`` are kept) and the final
    head. resume: a checkpoint folder, or an ``out`` folder (its newest checkpoint): the run
    continues there with the same loss curve as one that was never stopped; the settings that
    shape the curve must match. The head trains in float32 (float64 if the model is float64):
    a bfloat16/float16 head is cast to float32 in place.
    """
    t0 = time.perf_counter()
    data = as_dataset(data, processor=processor, images=images, model=model, **data_options)
    if len(data) == 0:
        raise ValueError("no training samples")
    for name, v in (("batch_size", batch_size), ("grad_accum", grad_accum)):
        _check_int(name, v)
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is not None:
        _check_int("steps", steps)
        total = steps
    else:
        epochs = 1.0 if epochs is None else float(epochs)
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        total = max(1, math.ceil(epochs * len(data) / (batch_size * grad_accum)))
    if not 0.0 <= glimpse_dropout < 1.0:
        raise ValueError(f"glimpse_dropout must be in [0, 1), got {glimpse_dropout}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if save_every is not None:
        _check_int("save_every", save_every)
    if keep_last is not None:
        _check_int("keep_last", keep_last)
    head.check_model(model)
    adapter = data.adapter
    adapter.parts(model)  # the model class is checked before anything runs
    device = next(model.parameters()).device
    if next(head.parameters()).dtype in (torch.bfloat16, torch.float16):
        head.float()  # AdamW on half-precision weights would round most updates away
    head.to(device)
    bf16 = device.type == "cuda" if bf16 is None else bool(bf16)
    warmup = math.ceil(warmup_ratio * total)
    settings = {"total_steps": total, "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed,
                "samples": len(data), "data": _fingerprint(data), "lr": lr, "warmup_steps": warmup, "weight_decay": weight_decay,
                "max_grad_norm": max_grad_norm, "glimpse_dropout": glimpse_dropout}

    from transformers import get_cosine_schedule_with_warmup
    params = [p for p in head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    result = TrainResult()
    start = 0
    if resume is not None:
        start = _load_checkpoint(resume, head, opt, sched, gen, settings, result)
    order = _Order(len(data), seed)
    out = None if out is None else os.fspath(out)
    if out is not None:
        os.makedirs(out, exist_ok=True)

    # Freeze the model for the run and give back its flags and mode afterwards.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training, head_training = model.training, head.training
    bar = _Progress(total, start, progress, sys.stderr if stream is None else stream)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()  # the model's own dropout stays off: only the glimpse's is part of the recipe
        head.train()
        for step in range(start, total):
            opt.zero_grad(set_to_none=True)
            sums = {"lm": 0.0, "dice": 0.0, "bce": 0.0}
            for m in range(grad_accum):
                first = (step * grad_accum + m) * batch_size
                items = [data[order[c]] for c in range(first, first + batch_size)]
                batch = _to(data.collate(items), device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits, lm = adapter.forward(model, head, batch, dropout=glimpse_dropout, generator=gen,
                                                 checkpointing=gradient_checkpointing)
                dice, bce = vip_losses(logits.float(), batch["box_mask"], batch.get("box_valid"))
                loss = dice + BCE_WEIGHT * bce + lm
                (loss / grad_accum).backward()
                for k, v in (("lm", lm), ("dice", dice), ("bce", bce)):
                    sums[k] += float(v.detach()) / grad_accum
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            rec = {"step": step + 1, "loss": sums["dice"] + BCE_WEIGHT * sums["bce"] + sums["lm"], **sums,
                   "lr": opt.param_groups[0]["lr"]}
            opt.step()
            sched.step()
            result.history.append(rec)
            bar.update(rec, total)
            done = step + 1
            if out is not None and (done == total or (save_every is not None and done % save_every == 0)):
                result.checkpoint = _save_checkpoint(out, done, head, opt, sched, gen, settings, result,
                                                     keep_last)
        if out is not None:
            _save_head_files(head, out)
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        head.train(head_training)
    result.seconds = time.perf_counter() - t0
    return result


def _fingerprint(data) -> str:
    """What the rows say (not where the image folder is): another file or filter changes the
    order's meaning, so a resume across it would not continue the same run."""
    h = hashlib.sha1()
    for r in data.rows:
        h.update(repr((r.line, r.question, r.answer, os.path.basename(r.image), r.width, r.height,
                       r.boxes)).encode())
    return h.hexdigest()


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _save_checkpoint(out, step, head, opt, sched, gen, settings, result, keep_last) -> str:
    final = os.path.join(out, f"checkpoint-{step}")

    def write(tmp):
        head.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "generator_device": str(gen.device),
                    "history": result.history, "settings": settings}, os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, STATE_JSON), "w") as f:
            json.dump({"step": step, "settings": settings, "history": result.history}, f, indent=1)

    _atomic_dir(final, write)
    if keep_last is not None:
        old = sorted(int(n[11:]) for n in os.listdir(out) if n.startswith("checkpoint-") and n[11:].isdigit())
        for s in old[:-keep_last]:
            if s != step:
                shutil.rmtree(os.path.join(out, f"checkpoint-{s}"), ignore_errors=True)
    return final


def _load_checkpoint(resume, head, opt, sched, gen, settings, result) -> int:
    path = os.fspath(resume)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"resume: {path} holds no checkpoint ({STATE_FILE} or checkpoint-<step>/)")
        path = latest
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    saved = state.get("settings", {})
    diff = [f"{k}: {saved.get(k)!r} (checkpoint) != {settings[k]!r} (now)" for k in _RESUME_KEYS
            if saved.get(k) != settings[k]]
    if diff:
        raise ValueError(f"resume from {path}: the run's settings differ, so the loss curve would too: "
                         + "; ".join(diff))
    weights = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    head.load_published_state(weights)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if state.get("generator_device") != str(gen.device):
        raise ValueError(f"resume from {path}: the checkpoint ran on {state.get('generator_device')}, this run on "
                         f"{gen.device}; the dropout masks would differ")
    gen.set_state(state["generator"])
    result.history[:] = list(state["history"])
    result.checkpoint = path
    return int(state["step"])


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, head: GlimpseHead, data, threshold: Optional[float] = None, min_keep: Optional[int] = None,
             max_ratio: Optional[float] = None, batch_size: int = 8, max_samples: Optional[int] = None,
             processor=None, images=None, **data_options) -> Dict[str, float]:
    """The kept set of GlimpsePrune's inference (``apply_glimpse``, its keep rule and options)
    against the box masks: mean Dice 2|K & M| / (|K| + |M|), mean IoU |K & M| / |K | M| (both 1
    when K and M are empty) and the mean kept ratio |K| / N, over the samples of ``data`` (the
    first ``max_samples``). Returns {"dice", "iou", "kept_ratio", "samples"}."""
    data = as_dataset(data, processor=processor, images=images, model=model, **data_options)
    _check_int("batch_size", batch_size)
    n = len(data) if max_samples is None else min(len(data), max_samples)
    if n == 0:
        raise ValueError("no samples to evaluate")
    device = next(model.parameters()).device
    dice = iou = kept = 0.0
    with apply_glimpse(model, head, threshold=threshold, min_keep=min_keep, max_ratio=max_ratio) as handle:
        for s in range(0, n, batch_size):
            items = [data[i] for i in range(s, min(n, s + batch_size))]
            inputs = _to(data.prompts(items), device)
            inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
            model(**inputs, logits_to_keep=1, use_cache=False)
            for it, pos in zip(items, handle.last_kept):
                m = it["box_mask"]
                k = torch.zeros_like(m)
                k[pos[0]] = True
                inter, nk, nm = int((k & m).sum()), int(k.sum()), int(m.sum())
                union = nk + nm - inter
                dice += 1.0 if nk + nm == 0 else 2 * inter / (nk + nm)
                iou += 1.0 if union == 0 else inter / union
                kept += nk / m.numel()
    return {"dice": dice / n, "iou": iou / n, "kept_ratio": kept / n, "samples": n}
