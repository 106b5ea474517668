"""GlimpsePrune training (vtkernels.glimpse: data, adapters, train, evaluate, `vtk glimpse-train`).

Offline and on the CPU: tiny random LLaVA-1.5 models built from configs (vtkernels.cli.tiny_llava,
a word-level vocabulary that covers every word below) and a synthetic Visual-CoT-style data set
written here: textured pictures with one or two coloured rectangles, the question naming one
rectangle's colour ("where is the red one ?"), its box the annotation, its quadrant the answer.

The models that train get a variance-preserving random initialisation (std 1/sqrt(fan_in)):
Hugging Face's std 0.02 at width 32-64 shrinks every signal about fivefold per layer, so the
image barely reaches the glimpse's attention and there is nothing to learn from; a trained
LLaVA's image tokens do reach it. Everything else is the library as users call it.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from vtkernels import cli
from vtkernels.glimpse import (BadDataError, GlimpseDataset, GlimpseHead, apply_glimpse, evaluate, read_rows,
                               train)
from vtkernels.glimpse.adapters import adapter_for, llava_box_mask, llava_geometry
from vtkernels.glimpse.data import box_grid_mask
from vtkernels.glimpse.train import STATE_FILE, latest_checkpoint, vip_losses

COLOURS = {"red": (215, 35, 35), "green": (35, 190, 50), "blue": (40, 70, 225), "yellow": (230, 215, 40)}
# Square and not: the processor resizes the short side to 112 and centre-crops, so boxes near
# the long sides get clipped (or cropped away) on the way.
SIZES = [(112, 112), (140, 112), (112, 140), (126, 126), (168, 112)]
# Prompts and answers of different lengths, so batches need padding.
QUESTIONS = ("where is the {} one ?", "where is the {} one in the picture ?", "which is the {} one ? where is it ?")
ANSWERS = ("{}", "it is at the {} .", "the {} one .")
# A small VIP (width 64, conditions 64) keeps training fast; the published 256 / 512 gives the
# same picture, five times slower.
SMALL_VIP = dict(attn_fuse_size=64, visual_cond_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Ops this small cost less than waking a thread pool, and on a shared machine two threads
    mostly wait for each other (the training run: 11 s on one thread, minutes on two under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def texture(rng, w, h):
    """Grey blocks of 7 px with pixel noise: no flat regions except the rectangles."""
    cells = rng.integers(70, 170, size=(h // 7 + 1, w // 7 + 1)).astype(np.uint8)
    base = np.asarray(Image.fromarray(cells).resize((w, h), Image.NEAREST)).astype(np.int16)
    return base[..., None] + rng.integers(-25, 25, size=(h, w, 3))


def write_synthetic(folder, n, seed, name, sizes=SIZES, box=(24, 50)):
    """n rows in folder/name (jsonl), images under folder/img/ of the (width, height) ``sizes``,
    rectangles of box[0] to box[1] - 1 pixels a side. Returns the jsonl path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rows = []
    for i in range(n):
        w, h = sizes[rng.integers(len(sizes))]
        arr = texture(rng, w, h)
        k = 1 + int(rng.random() < 0.5)
        names = list(rng.choice(list(COLOURS), size=k, replace=False))
        boxes = []
        while len(boxes) < k:
            bw, bh = int(rng.integers(*box)), int(rng.integers(*box))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            b = (x1, y1, x1 + bw, y1 + bh)
            if all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in boxes):
                boxes.append(b)
        for c, (x1, y1, x2, y2) in zip(names, boxes):
            arr[y1:y2, x1:x2] = COLOURS[c]
        path = f"img/{seed}_{i}.png"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, path))
        t = int(rng.integers(k))
        x1, y1, x2, y2 = boxes[t]
        where = ("top" if (y1 + y2) < h else "bottom") + " " + ("left" if (x1 + x2) < w else "right")
        question = QUESTIONS[rng.integers(len(QUESTIONS))].format(names[t])
        answer = ANSWERS[rng.integers(len(ANSWERS))].format(where)
        rows.append({"question": question, "answer": answer, "image": path,
                     "width": w, "height": h, "bboxs": [list(boxes[t])]})
    p = os.path.join(folder, name)
    with open(p, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return p


def tiny(seed=0, dtype=torch.float32, rescale=True, **kw):
    """A LLaVA-1.5 with 112 px / 14 = 8 x 8 patches, 4 tower layers, 4 LLM layers of 64."""
    args = dict(image_size=112, patch_size=14, vision_hidden=32, vision_layers=4, vision_heads=4,
                text_hidden=64, text_layers=4, seed=seed)
    args.update(kw)
    model, proc = cli.tiny_llava("llava", **args)
    if rescale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 4:  # the patch convolution
                    p.normal_(0, p[0].numel() ** -0.5, generator=g)
                elif p.dim() == 2 and "embed" not in name:  # linear layers (embedding tables keep theirs)
                    p.normal_(0, p.shape[1] ** -0.5, generator=g)
    return model.to(dtype), proc


def make_head(model, seed=0, **fields):
    torch.manual_seed(seed)
    K = min(2, model.config.text_config.num_hidden_layers - 1)
    return GlimpseHead.for_model(model, reduce_layer=K, **SMALL_VIP, **fields)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def keep_all_dice(ds):
    """Dice of keeping every token: the score a head that learned nothing but 'keep' gets."""
    d = [2 * int(ds[i]["box_mask"].sum()) / (ds[i]["box_mask"].numel() + int(ds[i]["box_mask"].sum()))
         for i in range(len(ds))]
    return sum(d) / len(d)


# ----------------------------------------------------------------------------- the training run

STEPS = int(os.environ.get("VTK_GLIMPSE_TRAIN_STEPS", "120"))
SEED = int(os.environ.get("VTK_GLIMPSE_TRAIN_SEED", "0"))  # to rerun the measurement on other seeds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run shared by several tests: 96 training rows, 32 held out, STEPS steps of 4."""
    root = tmp_path_factory.mktemp("glimpse_train")
    train_file = write_synthetic(str(root), 96, 100 + SEED, "train.jsonl")
    test_file = write_synthetic(str(root), 32, 900 + SEED, "test.jsonl")
    model, proc = tiny(seed=SEED)
    data = GlimpseDataset.from_source(train_file, root, proc, model)
    held = GlimpseDataset.from_source(test_file, root, proc, model)
    head = make_head(model, seed=SEED)
    before = evaluate(model, head, held)
    weights = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = root / "out"
    # lr 3e-3 (not the published 1e-4): a hundred steps instead of a thousand.
    result = train(model, head, data, steps=STEPS, lr=3e-3, batch_size=4, out=out, save_every=STEPS // 2,
                   progress=False, seed=SEED)
    after = evaluate(model, head, held)
    print(f"seed {SEED}: held-out dice {before['dice']:.3f} -> {after['dice']:.3f}, keep-all {keep_all_dice(held):.3f}, "
          f"kept {after['kept_ratio']:.3f}, {result.seconds:.1f} s")
    return dict(model=model, proc=proc, data=data, held=held, head=head, before=before, after=after,
                weights=weights, flags=flags, out=out, result=result, root=root)


def test_training_raises_the_held_out_dice(run):
    # Observed over seeds 0-7 of this set-up (VTK_GLIMPSE_TRAIN_SEED: the model, the head, the data
    # and the order): untrained 0.024 / 0.068 / 0.305 / 0.279 / 0.311 / 0.296 / 0.331 / 0.036 (it
    # keeps one token or nearly all), trained 0.563 / 0.569 / 0.622 / 0.539 / 0.568 / 0.631 / 0.641 /
    # 0.550, keep-all 0.304 / 0.285 / 0.305 / 0.260 / 0.310 / 0.323 / 0.331 / 0.296. The smallest
    # gain seen, over either, was 0.254 (seed 7 over keep-all): 0.15 leaves room for platform
    # noise, and beating keep-all by as much means the head localises rather than keeps.
    before, after = run["before"], run["after"]
    base = keep_all_dice(run["held"])
    assert 0.2 < base < 0.4
    assert after["dice"] > before["dice"] + 0.15, (before, after)
    assert after["dice"] > base + 0.15, (base, after)
    assert after["iou"] > before["iou"] + 0.1
    assert 0.05 < after["kept_ratio"] < 0.5  # it prunes, and keeps about the boxes' share
    assert after["samples"] == 32
    h = run["result"].history
    assert len(h) == STEPS and [r["step"] for r in h] == list(range(1, STEPS + 1))
    first, last = np.mean([r["dice"] for r in h[:10]]), np.mean([r["dice"] for r in h[-10:]])
    assert last < first - 0.2  # the Dice loss itself went down
    assert h[0]["lr"] == 0.0 and max(r["lr"] for r in h) == pytest.approx(3e-3, rel=1e-6)  # warm-up, peak


def test_frozen_model_is_bit_identical(run):
    model = run["model"]
    after = model.state_dict()
    assert set(after) == set(run["weights"])
    for k, v in run["weights"].items():
        assert torch.equal(after[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == run["flags"]
    assert not model.training


def test_checkpoints_and_the_saved_head(run):
    out, model, head, proc = run["out"], run["model"], run["head"], run["proc"]
    half, end = f"checkpoint-{STEPS // 2}", f"checkpoint-{STEPS}"
    assert sorted(p.name for p in out.iterdir()) == sorted([half, end, "config.json", "new_modules_gp.pt"])
    for c in (half, end):  # ... and no temporary folder left
        assert sorted(p.name for p in (out / c).iterdir()) == ["config.json", "new_modules_gp.pt",
                                                                "trainer_state.json", STATE_FILE]
    assert latest_checkpoint(out) == str(out / end)
    assert run["result"].checkpoint == str(out / end)
    state = json.loads((out / end / "trainer_state.json").read_text())
    assert state["step"] == STEPS and len(state["history"]) == STEPS
    # The published format: the state dict the published code loads, and the config with K.
    raw = torch.load(out / "new_modules_gp.pt", weights_only=True)
    assert set(raw) == {"attn_fuser", "learnable_embeddings", "le_proj", "le_norm"}
    assert json.loads((out / "config.json").read_text())["reduce_layer"] == 2
    loaded = GlimpseHead.from_pretrained(out, model=model)
    for (n, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    ck = GlimpseHead.from_pretrained(out / end, model=model)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), ck.state_dict().values()))
    # ... and prunes: apply_glimpse with the directory, generate on the pruned cache.
    it = run["held"][0]
    inputs = run["held"].prompts([it])
    with torch.no_grad(), apply_glimpse(model, str(out)) as handle:
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        n_kept = handle.last_lengths[0]
    assert gen.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert 1 <= n_kept < 64


# ----------------------------------------------------------------------------- exact resume

@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("glimpse_small")
    return root, write_synthetic(str(root), 10, 7, "rows.jsonl")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resume_reproduces_the_uninterrupted_run(small_set, tmp_path, dtype):
    root, rows = small_set
    model, proc = tiny(seed=3, dtype=dtype)
    data = GlimpseDataset.from_source(rows, root, proc, model, report=None)
    opts = dict(steps=6, lr=1e-3, batch_size=2, grad_accum=2, seed=5, save_every=2, keep_last=None,
                progress=False)  # 6 x 4 samples over 10 rows: the order crosses epochs
    head_a = make_head(model, seed=1).to(dtype)
    full = train(model, head_a, data, out=tmp_path / "a", **opts)
    # A fresh head with other weights and a fresh data set: everything must come from the checkpoint.
    head_b = make_head(model, seed=2).to(dtype)
    data_b = GlimpseDataset.from_source(rows, root, proc, model, report=None)
    resumed = train(model, head_b, data_b, out=tmp_path / "b", resume=tmp_path / "a" / "checkpoint-2", **opts)
    assert len(full.history) == 6
    # It did resume at step 2: it wrote the checkpoints of steps 4 and 6, not that of step 2.
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert resumed.history == full.history  # exact: every loss of every step, as Python floats
    for (n, a), (_, b) in zip(head_a.state_dict().items(), head_b.state_dict().items()):
        assert torch.equal(a, b), n
    assert len({r["loss"] for r in full.history}) == 6  # the steps differ: the comparison means something
    # Resuming from the out folder takes its newest checkpoint (here: the end, nothing left to run).
    head_c = make_head(model, seed=4).to(dtype)
    done = train(model, head_c, data, out=tmp_path / "c", resume=tmp_path / "a", **opts)
    assert done.history == full.history
    assert all(torch.equal(a, b) for a, b in zip(head_a.state_dict().values(), head_c.state_dict().values()))
    with pytest.raises(ValueError, match="total_steps"):
        train(model, make_head(model).to(dtype), data, **{**opts, "steps": 8}, resume=tmp_path / "a")
    other = GlimpseDataset.from_source(rows, root, proc, model, max_samples=9, report=None)
    with pytest.raises(ValueError, match="samples: 10 .checkpoint. != 9"):
        train(model, make_head(model).to(dtype), other, **opts, resume=tmp_path / "a")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(model, make_head(model).to(dtype), data, **opts, resume=tmp_path / "nothing")


# ----------------------------------------------------------------------------- the training forward

@pytest.fixture(scope="module")
def f64(small_set):
    root, rows = small_set
    model, proc = tiny(seed=4, dtype=torch.float64)
    return model, proc, GlimpseDataset.from_source(rows, root, proc, model, report=None)


def test_training_glimpse_sees_what_inference_sees(f64):
    """The glimpse at the first answer token's place attends to the keys it attends to at inference
    (prompt + itself): the VIP logits of the training forward equal those apply_glimpse computes."""
    model, proc, data = f64
    head = make_head(model, seed=3).double()
    items = [data[i] for i in range(3)]
    with torch.no_grad():
        logits, _ = data.adapter.forward(model, head, data.collate(items), training=False)
        seen = []
        orig = head.predict
        head.predict = lambda A, c, g: seen.append(orig(A, c, g)) or seen[-1]
        try:
            inputs = data.prompts(items)
            inputs["pixel_values"] = inputs["pixel_values"].double()
            with apply_glimpse(model, head):
                model(**inputs)
        finally:
            del head.predict
    # Inference forms A in float32 (ops.glimpse_logits), training in float64.
    assert_close(logits, seen[0], atol=2e-5, rtol=1e-5)


def _reference_lm_loss(model, head, batch):
    """The model's own forward: inputs_embeds with the image features and g(0) in place, g(l)
    added before layer l by pre-hooks; then the cross-entropy of position t against label t + 1
    (in float64: Hugging Face's own loss would round to float32)."""
    ids, gidx = batch["input_ids"], batch["glimpse_index"]
    B = ids.shape[0]
    g = head.glimpse_embeddings()
    feats = model.get_image_features(pixel_values=batch["pixel_values"].double())
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    emb = model.get_input_embeddings()(ids).clone()
    emb[ids == model.config.image_token_id] = feats.reshape(-1, emb.shape[-1])
    emb[torch.arange(B), gidx] = g[0]

    def adder(l):
        def hook(_m, args, kwargs):
            hs = (args[0] if args else kwargs["hidden_states"]).clone()
            hs[torch.arange(B), gidx] += g[l]
            if args:
                return (hs,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = hs
            return args, kwargs
        return hook

    layers = model.model.language_model.layers
    hooks = [layers[l].register_forward_pre_hook(adder(l), with_kwargs=True) for l in range(1, len(layers))]
    try:
        logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
    finally:
        for h in hooks:
            h.remove()
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][target != -100], target[target != -100])


def test_lm_loss_predicts_the_answer_from_the_glimpse(f64):
    model, proc, data = f64
    head = make_head(model, seed=5).double()
    items = [data[i] for i in (0, 3, 5)]
    batch = data.collate(items)
    # The layout: prompt, the glimpse slot, the answer one place later; the glimpse's output
    # predicts the answer's first token and the labels are the answer alone.
    for b, it in enumerate(items):
        T = it["glimpse_index"]
        answer = proc.tokenizer(data.rows[[0, 3, 5][b]].answer, add_special_tokens=False)["input_ids"]
        answer = answer + [proc.tokenizer.eos_token_id]
        assert batch["input_ids"][b, T + 1:T + 1 + len(answer)].tolist() == answer
        assert (batch["labels"][b, :T + 1] == -100).all()
        assert batch["labels"][b, T + 1:T + 1 + len(answer)].tolist() == answer
    assert len({it["input_ids"].shape[0] for it in items}) > 1  # padding is exercised
    with torch.no_grad():
        _, lm = data.adapter.forward(model, head, batch, training=False)
        ref = _reference_lm_loss(model, head, batch)
    assert_close(lm, ref.to(lm.dtype), atol=1e-10, rtol=1e-10)


def test_padded_batch_equals_each_sample_alone(f64):
    model, proc, data = f64
    head = make_head(model, seed=6).double()
    items = [data[i] for i in range(4)]
    with torch.no_grad():
        logits, _ = data.adapter.forward(model, head, data.collate(items), training=False)
        for b, it in enumerate(items):
            one, _ = data.adapter.forward(model, head, data.collate([it]), training=False)
            assert_close(logits[b:b + 1], one, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- bad rows

def _rows_with_bad(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (60, 40), (9, 9, 9)).save(folder / "ok.png")
    good = {"question": "where is the red one ?", "answer": "top left", "image": "ok.png", "width": 60,
            "height": 40, "bboxs": [[1, 2, 30, 20]]}
    lines = [json.dumps(good)] * 12
    bad = {
        3: {**good, "image": "missing.png"},
        5: {**good, "bboxs": [[10, 10, 10, 20]]},
        6: {**good, "bboxs": [[30, 10, 20, 20]]},
        8: {**good, "bboxs": [[10, 10, 61, 20]]},
        9: {k: v for k, v in good.items() if k != "answer"},
        11: {**good, "bboxs": []},
        13: {**good, "width": 80},
    }
    for line, row in bad.items():
        lines.insert(line - 1, json.dumps(row))
    lines.insert(14, '{"question": "broken')  # line 15
    lines.insert(15, "")  # a blank line is not a row
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p, folder


def test_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path):
    import io
    p, folder = _rows_with_bad(tmp_path)
    report = io.StringIO()
    rows, bad, read = read_rows(p, folder, max_bad_fraction=0.5, report=report)
    reasons = {b.line: b.reason for b in bad}
    assert sorted(reasons) == [3, 5, 6, 8, 9, 11, 13, 15]
    assert "not found" in reasons[3]
    assert "empty or inverted" in reasons[5] and "empty or inverted" in reasons[6]
    assert "outside the 60x40 image" in reasons[8]
    assert "answer missing" in reasons[9]
    assert "no box" in reasons[11]
    assert "is 60x40, the row says 80x40" in reasons[13]
    assert "unreadable JSON" in reasons[15]
    assert read == 20 and len(rows) == 12
    assert all(r.line not in reasons for r in rows) and rows[0].boxes == ((1.0, 2.0, 30.0, 20.0),)
    text = report.getvalue()
    for line in reasons:
        assert f"line {line}:" in text
    assert "20 rows read, 8 bad (40.0%) and skipped, 12 used" in text
    # max_samples stops reading once enough good rows are in.
    rows, bad, read = read_rows(p, folder, max_bad_fraction=0.5, max_samples=3, report=None)
    assert len(rows) == 3 and [b.line for b in bad] == [3] and read == 4


def test_too_many_bad_rows_fail(tmp_path):
    p, folder = _rows_with_bad(tmp_path)
    with pytest.raises(BadDataError, match=r"8 of 20 rows are bad \(40.0% > max_bad_fraction 10.0%\)") as e:
        read_rows(p, folder, report=None)
    assert [b.line for b in e.value.bad_rows] == [3, 5, 6, 8, 9, 11, 13, 15]
    model, proc = tiny(rescale=False, text_layers=1, vision_layers=1)
    with pytest.raises(BadDataError, match="line 3"):
        GlimpseDataset.from_source(p, folder, proc, model, report=None)
    with pytest.raises(ValueError, match="image folder"):
        read_rows(p, tmp_path / "nowhere")
    empty = tmp_path / "none.jsonl"
    empty.write_text('{"a": 1}\n')
    with pytest.raises(BadDataError, match="no usable row"):
        read_rows(empty, folder, max_bad_fraction=1.0, report=None)


# ----------------------------------------------------------------------------- box geometry

def test_grid_rule():
    # Rows int(y1 * H) .. min(int(y2 * H), H - 1), inclusive; the same for columns; union of boxes.
    m = box_grid_mask([(0.0, 0.3, 0.26, 0.5)], 4, 4).view(4, 4)
    assert m.nonzero().tolist() == [[1, 0], [1, 1], [2, 0], [2, 1]]  # y2 * 4 = 2.0: row 2 included
    m = box_grid_mask([(0.9, 0.9, 1.0, 1.0), (0.0, 0.0, 0.1, 0.1)], 4, 4).view(4, 4)
    assert m.nonzero().tolist() == [[0, 0], [3, 3]]  # the far edge clamps to H - 1
    assert not box_grid_mask([], 3, 3).any()


def coverage(processor, image, grid):
    """Per grid cell, the fraction of its pixels the processor made bright (the white box)."""
    px = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"][0]
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None, None]
    std = torch.tensor(ip.image_std)[:, None, None]
    bright = ((px * std + mean).mean(0) > 0.85).float()
    cell = px.shape[-1] // grid
    return bright.view(grid, cell, grid, cell).mean((1, 3)).reshape(-1)


def boxes_image(w, h, boxes):
    im = Image.new("RGB", (w, h), (0, 0, 0))
    for x1, y1, x2, y2 in boxes:
        im.paste((255, 255, 255), (x1, y1, x2, y2))
    return im


def _processor(image_processor):
    from transformers import LlavaProcessor
    return LlavaProcessor(image_processor=image_processor, tokenizer=cli.tiny_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_box_mask_pad_to_square():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    proc = _processor(LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 112},
                                             crop_size={"height": 112, "width": 112}))
    # 160 x 100 padded to 160 x 160 (30 px above and below), then 0.7x to 112: a cell is 20 px of
    # the padded square. Box x 25..75, y 15..60 -> padded y 45..90 -> rows 2..4, columns 1..3.
    box = (25, 15, 75, 60)
    ax, bx, ay, by, ow, oh = llava_geometry(proc.image_processor, 160, 100)
    assert (ow, oh) == (112, 112)
    assert (ax, bx, ay, by) == pytest.approx((0.7, 0.0, 0.7, 21.0))
    m = llava_box_mask(proc.image_processor, [box], 160, 100, 8, 8)
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[2:5, 1:4] = True
    assert torch.equal(m.view(8, 8), expect)
    # The processor's own pixels agree: covered cells are partly white (a corner cell: a product of
    # two partial edges), the others black (the resize's blur stays below the brightness threshold).
    cov = coverage(proc, boxes_image(160, 100, [box]), 8)
    assert torch.equal(cov > 0.1, m) and ((cov > 0.15) | (cov < 0.02)).all()
    # The published rule (boxes over the original size, padding ignored) marks rows 1..4.
    assert box_grid_mask([(25 / 160, 15 / 100, 75 / 160, 60 / 100)], 8, 8).view(8, 8)[1].any()


def test_box_mask_centre_crop_clips():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    proc = _processor(CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}))
    # 224 x 160: short side 160 -> 112 (0.7), long side int(112 * 224 / 160) = 156; crop 22 px off
    # the left. A: x 60..120 -> 19.8..61.6 -> columns 1..4; y 50..110 -> 35..77 -> rows 2..5.
    # B: x 0..50 starts 22 px left of the crop: clipped to 0..12.8 -> column 0. C: x 0..25 ends at
    # -4.6: cropped away, it marks nothing.
    A, B, C = (60, 50, 120, 110), (0, 50, 50, 110), (0, 0, 25, 40)
    ax, bx, ay, by, ow, oh = llava_geometry(proc.image_processor, 224, 160)
    assert (ax, bx, ay, by, ow, oh) == pytest.approx((156 / 224, -22.0, 0.7, 0.0, 112, 112))
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[2:6, 1:5] = True
    assert torch.equal(llava_box_mask(proc.image_processor, [A], 224, 160, 8, 8).view(8, 8), expect)
    expect_b = torch.zeros(8, 8, dtype=torch.bool)
    expect_b[2:6, 0] = True
    assert torch.equal(llava_box_mask(proc.image_processor, [B], 224, 160, 8, 8).view(8, 8), expect_b)
    assert not llava_box_mask(proc.image_processor, [C], 224, 160, 8, 8).any()
    m = llava_box_mask(proc.image_processor, [A, C], 224, 160, 8, 8)
    cov = coverage(proc, boxes_image(224, 160, [A, C]), 8)
    assert torch.equal(cov > 0.1, m) and ((cov > 0.15) | (cov < 0.02)).all()
    # A tall image: the crop is vertical (offset (156 - 112) // 2 = 22 px off the top).
    assert llava_geometry(proc.image_processor, 160, 224) == pytest.approx((0.7, 0.0, 156 / 224, -22.0, 112, 112))


def test_box_mask_of_a_sample_follows_the_processor(small_set):
    """The data set's mask for a row is llava_box_mask of that row, and the pixel_values it pairs
    with are the processor's."""
    root, rows = small_set
    model, proc = tiny(rescale=False, text_layers=1, vision_layers=1)
    data = GlimpseDataset.from_source(rows, root, proc, model, report=None)
    marked = 0
    for i in range(4):
        row, it = data.rows[i], data[i]
        want = llava_box_mask(proc.image_processor, row.boxes, row.width, row.height, 8, 8)
        assert torch.equal(it["box_mask"], want)
        marked += bool(want.any())
        px = proc(images=Image.open(row.image).convert("RGB"), text="<image>", return_tensors="pt")["pixel_values"]
        assert torch.equal(it["pixel_values"], px[0])
    assert marked >= 3


# ----------------------------------------------------------------------------- models and options

def test_other_models_are_clear_errors(tmp_path):
    from transformers import AutoConfig, Qwen3VLConfig
    with pytest.raises(NotImplementedError, match="not implemented: of the Qwen-VL families only Qwen2.5-VL"):
        adapter_for(Qwen3VLConfig())
    nxt, proc = cli.tiny_llava("llava_next", image_size=56, patch_size=14, vision_hidden=32, vision_layers=1,
                               text_hidden=32, text_layers=1)
    with pytest.raises(ValueError, match="supports LLaVA-1.5 .* and Qwen2.5-VL"):
        adapter_for(nxt)
    with pytest.raises(ValueError, match="supports LLaVA-1.5"):
        GlimpseDataset.from_source([], tmp_path, proc, nxt)
    # The command line says the same before loading any weights.
    qwen = tmp_path / "qwen3"
    Qwen3VLConfig().save_pretrained(qwen)
    assert AutoConfig.from_pretrained(qwen).model_type == "qwen3_vl"
    with pytest.raises(SystemExit, match="not implemented"):
        cli.main(["glimpse-train", "--model", str(qwen), "--data", "x.jsonl", "--images", str(tmp_path),
                  "--out", str(tmp_path / "o")])


def test_train_options(small_set, tmp_path):
    root, rows = small_set
    model, proc = tiny(rescale=False, text_layers=2, vision_layers=2)
    data = GlimpseDataset.from_source(rows, root, proc, model, report=None)
    head = make_head(model)
    with pytest.raises(ValueError, match="steps or epochs"):
        train(model, head, data, steps=2, epochs=1)
    with pytest.raises(ValueError, match="batch_size"):
        train(model, head, data, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="processor= and images="):
        train(model, head, rows)
    # epochs: ceil(epochs * 10 rows / (3 x 2)) optimizer steps; a path works with processor and images.
    r = train(model, head, rows, epochs=1.5, batch_size=3, grad_accum=2, processor=proc, images=root,
              progress=False, report=None)
    assert len(r.history) == math.ceil(1.5 * 10 / 6) and r.checkpoint is None
    # A bfloat16 head trains in float32 master weights.
    hb = make_head(model).to(torch.bfloat16)
    train(model, hb, data, steps=1, progress=False)
    assert next(hb.parameters()).dtype == torch.float32


def test_progress_goes_to_the_stream(small_set, monkeypatch):
    import io
    root, rows = small_set
    model, proc = tiny(rescale=False, text_layers=1, vision_layers=1)
    data = GlimpseDataset.from_source(rows, root, proc, model, report=None)
    s = io.StringIO()
    train(model, make_head(model), data, steps=2, stream=s)  # tqdm's bar
    assert "glimpse-train" in s.getvalue() and "loss=" in s.getvalue() and "dice=" in s.getvalue()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed: plain lines
    s = io.StringIO()
    train(model, make_head(model), data, steps=2, stream=s)
    lines = s.getvalue().splitlines()
    assert [ln.split()[:3] for ln in lines] == [["glimpse-train", "step", "1/2"], ["glimpse-train", "step", "2/2"]]
    assert all(" loss " in ln and " dice " in ln and " lm " in ln and " bce " in ln for ln in lines)


# ----------------------------------------------------------------------------- the command line

def test_cli_end_to_end(tmp_path, capsys):
    model, proc = tiny(seed=2, text_layers=2, vision_layers=2)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    proc.save_pretrained(ckpt)
    data = write_synthetic(str(tmp_path), 9, 11, "rows.jsonl")
    with open(data, "a") as f:  # line 10: its image is missing
        f.write(json.dumps({"question": "where is the red one ?", "answer": "top left", "image": "img/none.png",
                            "width": 112, "height": 112, "bboxs": [[1, 1, 20, 20]]}) + "\n")
    out = tmp_path / "out"
    args = ["glimpse-train", "--model", str(ckpt), "--data", data, "--images", str(tmp_path), "--out", str(out),
            "--steps", "3", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--device", "cpu",
            "--max-bad-fraction", "0.2", "--save-every", "2", "--eval-samples", "4"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "line 10: image file" in captured.err and "not found" in captured.err
    assert "9 training samples (10 rows read, 1 skipped)" in captured.err
    assert "evaluation on 4 rows" in captured.out and "dice" in captured.out and "kept ratio" in captured.out
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()
    assert len(json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["history"]) == 3
    head = GlimpseHead.from_pretrained(out)
    assert head.reduce_layer == 1  # round(2/3 of 2 layers)
    # --gradient-checkpointing: the same run, the same head (recomputation changes memory only).
    out2 = tmp_path / "out-ckpt"
    assert cli.main([str(out2) if a == str(out) else a for a in args] + ["--gradient-checkpointing"]) == 0
    capsys.readouterr()
    for a, b in zip(head.state_dict().values(), GlimpseHead.from_pretrained(out2).state_dict().values()):
        assert_close(b, a, atol=1e-6, rtol=1e-5)
    # Resuming the finished run from its folder: nothing left to train, the same head; evaluated
    # on held-out rows this time.
    held = write_synthetic(str(tmp_path), 3, 12, "held.jsonl")
    assert cli.main(args + ["--resume", str(out), "--eval-data", held]) == 0
    again = GlimpseHead.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    assert f"evaluation on 3 rows of {held}:" in capsys.readouterr().out
    # Too many bad rows: a clear error, not a traceback.
    with pytest.raises(SystemExit, match="rows are bad"):
        cli.main(args[:-6] + ["--max-bad-fraction", "0.05"])


def test_cli_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-m", "vtkernels.cli", "glimpse-train", "--help"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    for opt in ("--model", "--data", "--images", "--out", "--steps", "--epochs", "--lr", "--batch-size",
                "--grad-accum", "--max-samples", "--seed", "--resume", "--device", "--max-bad-fraction"):
        assert opt in res.stdout
    assert "bboxs" in res.stdout and "Qwen2.5-VL" in res.stdout and "not yet" not in res.stdout


def test_gradient_checkpointing_gives_the_same_gradients(f64):
    """Recomputing each layer in the backward (train(gradient_checkpointing=True)) changes memory,
    not the result: the same losses and head gradients, dropout included (its masks are drawn
    before the layers run)."""
    model, proc, data = f64
    batch = data.collate([data[i] for i in range(3)])
    grads = []
    layer0 = model.model.language_model.layers[0]
    for ckpt in (False, True):
        head = make_head(model, seed=7).double()
        gen = torch.Generator().manual_seed(5)
        runs = []
        hook = layer0.register_forward_pre_hook(lambda *_: runs.append(1))  # recomputation may stop early
        try:
            logits, lm = data.adapter.forward(model, head, batch, dropout=0.1, generator=gen, checkpointing=ckpt)
            dice, bce = vip_losses(logits, batch["box_mask"])
            (dice + 0.1 * bce + lm).backward()
        finally:
            hook.remove()
        assert len(runs) == (2 if ckpt else 1)  # recomputed in the backward under checkpointing
        grads.append((float(lm.detach()), {n: p.grad.clone() for n, p in head.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert set(grads[0][1]) == set(grads[1][1])
    for n, g in grads[0][1].items():
        assert_close(grads[1][1][n], g, atol=1e-12, rtol=1e-10)
    assert any(float(g.abs().sum()) > 0 for n, g in grads[0][1].items() if n.startswith("learnable"))
