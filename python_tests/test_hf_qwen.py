"""vtkernels.hf on small Qwen2.5-VL / Qwen3-VL / Qwen3.5 models with random weights, built offline.

The models run in float64, where pruning is exact. The hand reference below never calls the
library: it takes the score block's input from the tower (a pre-hook), recomputes q and k with the
block's norm and qkv weights and its 2D rotary built here from the patch grid (checked against
the attention weights Hugging Face's eager kernel computes), maps Qwen2.5-VL's window order back
to raster order with a window layout built here, pools merge units, selects with
vtkernels.reference, lays the kept tokens into the sequence with M-RoPE ids computed here from the
grids, and runs the language model on that. Runs on the latest transformers and on 5.17.
"""
import copy

import pytest
import torch
from torch.testing import assert_close

import vtkernels.hf as vhf
from vtkernels import ops
from vtkernels import reference as ref
from vtkernels.cli import tiny_qwen
from pictures import picture

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
METHODS = ["fopru_rank", "fopru_row", "vispruner", "prumerge", "prumerge_plus"]
FIXED = METHODS[:3]
# keep=6: the larger images keep 6 merge units, the 2 x 2-unit one keeps all 4 (per-image budget).
OPTS = {"fopru_rank": {"keep": 6}, "fopru_row": {"keep": 6}, "vispruner": {"keep": 6},
        "prumerge": {"knn": 4}, "prumerge_plus": {"knn": 4}}
TOL = dict(atol=1e-10, rtol=1e-9)  # float64 end to end
# Qwen3.5's gated delta-net layers are not batch-invariant: unpruned, a left-padded row's logits
# differ from the same prompt alone by about 1e-8 (measured); pruning adds nothing to that.
BATCH_TOL = {"qwen3_5": dict(atol=1e-7, rtol=1e-6)}
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
SEEDS = {"qwen2_5_vl": 11, "qwen3_vl": 12, "qwen3_5": 13}
_MODELS = {}


def model_of(family):
    if family not in _MODELS:
        model, proc = tiny_qwen(family, seed=SEEDS[family])
        _MODELS[family] = (model.double(), proc)
    return _MODELS[family]


def ragged_batch():
    """Three prompts of different lengths (left padding); the first holds two images; images of
    different sizes, one of them only 2 x 2 merge units."""
    texts = [f"user : {IMG} {IMG} which one shows a tree ? assistant :",
             f"user : {IMG} what ? assistant :",
             f"user : {IMG} how many windows are there in the house ? assistant :"]
    images = [picture(3, 100, 150), picture(4, 56, 56), picture(5, 130, 90), picture(6, 90, 120)]
    return texts, [images[:2], images[2:3], images[3:]]


def encode(proc, texts, groups):
    return proc(images=[im for g in groups for im in g], text=texts)


def score_block(model):
    vc = model.config.vision_config
    full = getattr(vc, "fullatt_block_indexes", None)
    return full[-1] if full else vc.depth - 1


# ----------------------------------------------------------------------------- hand reference

def tower_layout(model, grid):
    """Per patch in tower order: its (row, col) in its image; and per merge unit in tower order, its
    raster index among all units (Qwen2.5-VL: windows of ws x ws units, raster over windows, raster
    inside a window, as the model's window attention orders them)."""
    vc = model.config.vision_config
    m = vc.spatial_merge_size
    windowed = getattr(vc, "fullatt_block_indexes", None) is not None
    ws = vc.window_size // vc.patch_size // m if windowed else None
    rows, cols, units, base = [], [], [], 0
    for _, h, w in grid.tolist():
        gh, gw = h // m, w // m
        if windowed:
            order = [r * gw + c for wr in range(0, gh, ws) for wc in range(0, gw, ws)
                     for r in range(wr, min(wr + ws, gh)) for c in range(wc, min(wc + ws, gw))]
        else:
            order = list(range(gh * gw))
        for u in order:
            ur, uc = divmod(u, gw)
            for sr in range(m):
                for sc in range(m):
                    rows.append(ur * m + sr)
                    cols.append(uc * m + sc)
            units.append(base + u)
        base += gh * gw
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(units)


def rotate(x, rows, cols, head_dim, theta):
    """The towers' 2D rotary: angles (row f, col f), f = theta^(-2j / (head_dim / 2)), rotate-half
    form. The towers rotate in float32 whatever their dtype; so does this reference."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))
    ang = torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=-1)
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]  # [S, 1, head_dim]
    xf = x.float()
    half = torch.cat([-xf[..., head_dim // 2:], xf[..., :head_dim // 2]], dim=-1)
    return (xf * ang.cos() + half * ang.sin()).to(x.dtype)


def hand_qk(model, pixel_values, grid):
    """The score block's q and k after rotary [S, H, hd], k before rotary [S, C], and the merger's
    output (the model's own) with the deepstack features."""
    vis = model.model.visual
    blk = vis.blocks[score_block(model)]
    got = {}

    def pre(_m, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]

    hook = blk.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            out = vis(pixel_values.to(vis.dtype), grid_thw=grid)
    finally:
        hook.remove()
    vc = model.config.vision_config
    H = vc.num_heads
    with torch.no_grad():
        qkv = blk.attn.qkv(blk.norm1(got["h"]))
    S, C = qkv.shape[0], qkv.shape[1] // 3
    q, k, _ = qkv.view(S, 3, H, C // H).unbind(1)
    rows, cols, units = tower_layout(model, grid)
    theta = vc.rope_parameters["rope_theta"] if getattr(vc, "rope_parameters", None) else 10000.0
    deep = list(getattr(out, "deepstack_features", None) or [])
    return (rotate(q, rows, cols, C // H, theta), rotate(k, rows, cols, C // H, theta), k.reshape(S, C),
            units, out.pooler_output, deep)


def hand_images(model, inputs, method, opts):
    """Per image: (tokens [m, D], deepstack [L][m, D], ordinals [m] in the merged grid, kept
    positions, merged grid (gh, gw)) pruned by hand."""
    grid = inputs["image_grid_thw"]
    q, k, k_raw, units, merged, deep = hand_qk(model, inputs["pixel_values"], grid)
    H = model.config.vision_config.num_heads
    m = model.config.vision_config.spatial_merge_size
    S, C = k_raw.shape
    # Patch scores per image segment (the images are contiguous in tower order), pooled per unit.
    unit_scores, unit_keys, start = [], [], 0
    for _, h, w in grid.tolist():
        n = h * w
        s = ref.attention_received(q[None, start:start + n].reshape(1, n, C),
                                   k[None, start:start + n].reshape(1, n, C), H, has_cls=False)[0]
        unit_scores.append(s.view(-1, m * m).mean(1))
        unit_keys.append(k_raw[start:start + n].view(-1, m * m, C).mean(1))
        start += n
    raster_s = torch.empty(S // (m * m), dtype=torch.float32)
    raster_k = torch.empty(S // (m * m), C, dtype=k_raw.dtype)
    raster_s[units] = torch.cat(unit_scores)
    raster_k[units] = torch.cat(unit_keys)
    out, off = [], 0
    for _, h, w in grid.tolist():
        gh, gw = h // m, w // m
        n = gh * gw
        x, s, kk = merged[off:off + n], raster_s[off:off + n], raster_k[off:off + n]
        ds = [d[off:off + n] for d in deep]
        off += n
        if method in FIXED:
            keep = min(opts["keep"], n)
            if method == "vispruner":
                idx = ref.vispruner_select(x[None], s[None], keep)[0]
            else:
                idx = ref.fopru_select(x[None], s[None], keep, method.split("_")[1], gw)[1][0]
            out.append((x[idx], [d[idx] for d in ds], idx.tolist(), idx.tolist(), (gh, gw)))
            continue
        plus = method == "prumerge_plus"
        toks, lens = ref.prumerge(x[None], kk[None], s[None], opts["knn"], plus)
        count = ref.prumerge_counts(s[None])[0]
        order = ref.rank_order(s[None])[0].tolist()
        centres = order[:count] + (ref.prumerge_samples(n, count, order[:count]) if plus else [])
        L = int(lens[0])
        assert len(centres) == L - 1
        perm = torch.tensor(centres).argsort()
        cs = sorted(centres)
        # ALGORITHMS.md: merged tokens in raster order of their centres, the summary last with the
        # ids of the image's last merge unit and zero deepstack features.
        tokens = torch.cat([toks[0, :L - 1][perm], toks[0, L - 1:L]])
        dsk = [torch.cat([d[cs], torch.zeros_like(d[:1])]) for d in ds]
        out.append((tokens, dsk, cs + [n - 1], cs, (gh, gw)))
    return out


def hand_row(model, ids, mask, images):
    """One prompt (its attended tokens), images laid in by hand: (ids, embeds, M-RoPE ids [3, L],
    image slots, deepstack list) -- text ids count up, an image at position s gives unit (r, c) the
    ids (s, s + r, s + c) and moves the text on by max(gh, gw), kept tokens keep theirs."""
    img_id = model.config.image_token_id
    ids = [t for t, a in zip(ids.tolist(), mask.tolist()) if a]
    out_ids, pos, slots, feats, deeps = [], [], [], [], []
    cur, i = 0, 0
    while i < len(ids):
        if ids[i] != img_id:
            out_ids.append(ids[i])
            pos.append([cur, cur, cur])
            slots.append(False)
            cur += 1
            i += 1
            continue
        tokens, deep, ordinals, _, (gh, gw) = images.pop(0)
        n = gh * gw
        assert ids[i:i + n] == [img_id] * n
        for o in ordinals:
            r, c = divmod(o, gw)
            out_ids.append(img_id)
            pos.append([cur, cur + r, cur + c])
            slots.append(True)
        feats.append(tokens)
        deeps.append(deep)
        cur += max(gh, gw)
        i += n
    return torch.tensor(out_ids), torch.tensor(pos).T, torch.tensor(slots), feats, deeps


def hand_logits(model, rows, extra=None, length=None):
    """The language model on hand-built rows, left-padded to ``length`` (default: the longest) as a
    batch is (padding attends to nothing and is attended by nothing); ``extra``: embeddings
    appended to a single row (greedy decoding by hand). Returns [B, L, vocab]."""
    L = length or max(r[0].shape[0] for r in rows) + (0 if extra is None else extra.shape[0])
    B = len(rows)
    emb_layer = model.get_input_embeddings()
    embeds, masks, poss, slotss, deep_rows = [], [], [], [], []
    with torch.no_grad():
        for ids, pos, slots, feats, deeps in rows:
            e = emb_layer(ids).masked_scatter(slots[:, None], torch.cat(feats).to(torch.float64))
            n_extra = 0
            if extra is not None:
                e = torch.cat([e, extra])
                n_extra = extra.shape[0]
                slots = torch.cat([slots, torch.zeros(n_extra, dtype=torch.bool)])
            pad = L - e.shape[0]
            embeds.append(torch.cat([e.new_zeros(pad, e.shape[1]), e]))
            masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(e.shape[0], dtype=torch.long)]))
            poss.append(torch.cat([torch.zeros(3, pad, dtype=torch.long), pos], dim=1))
            slotss.append(torch.cat([torch.zeros(pad, dtype=torch.bool), slots]))
            deep_rows.append(deeps)
        kw = {}
        if deep_rows[0] and deep_rows[0][0]:
            n_layers = len(deep_rows[0][0])
            kw = dict(visual_pos_masks=torch.stack(slotss),
                      deepstack_visual_embeds=[torch.cat([d[l] for deeps in deep_rows for d in deeps])
                                               for l in range(n_layers)])
        h = model.model.language_model(inputs_embeds=torch.stack(embeds), attention_mask=torch.stack(masks),
                                       position_ids=torch.stack(poss, dim=1), **kw).last_hidden_state
        return model.lm_head(h)


def rows_alone(model, proc, texts, groups, method, opts):
    """Per prompt: the hand-built pruned row and its images."""
    rows = []
    for text, imgs in zip(texts, groups):
        one = encode(proc, [text], [imgs])
        images = hand_images(model, one, method, opts)
        kept = [im[3] for im in images]
        lengths = [im[0].shape[0] for im in images]
        rows.append((hand_row(model, one["input_ids"][0], one["attention_mask"][0], images), kept, lengths))
    return rows


# ----------------------------------------------------------------------------- the hand reference is real

@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_hand_scores_are_the_attention_maps(family, monkeypatch):
    """q/k recomputed by hand (norm1 -> qkv -> 2D rotary built from the grid, window order built by
    hand) give the attention weights Hugging Face's eager kernel computes in the score block."""
    import sys
    model, proc = model_of(family)
    texts, groups = ragged_batch()
    inputs = encode(proc, texts[:1], groups[:1])
    eager = copy.deepcopy(model)
    eager.model.visual.set_attn_implementation("eager")
    blk = eager.model.visual.blocks[score_block(eager)]
    mod = sys.modules[type(blk.attn).__module__]
    seen = []
    real = mod.eager_attention_forward

    def recording(module, *a, **kw):
        out = real(module, *a, **kw)
        if module is blk.attn:
            seen.append(out[1])
        return out

    q, k, _, _, _, _ = hand_qk(eager, inputs["pixel_values"], inputs["image_grid_thw"])
    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    with torch.no_grad():
        eager.model.visual(inputs["pixel_values"].double(), grid_thw=inputs["image_grid_thw"])
    H = model.config.vision_config.num_heads
    assert len(seen) == 2  # one segment per image
    start = 0
    for w in seen:  # [1, H, n, n] per image
        n = w.shape[-1]
        C = q.shape[1] * q.shape[2]
        mine = ref.attention_received(q[None, start:start + n].reshape(1, n, C), k[None, start:start + n].reshape(1, n, C),
                                      H, has_cls=False)[0]
        assert_close(mine.double(), w[0].mean(0).mean(0), atol=1e-7, rtol=1e-6)
        start += n


# ----------------------------------------------------------------------------- against the hand reference

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_model_pruned_by_hand(family, method):
    model, proc = model_of(family)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, groups)
    want = rows_alone(model, proc, texts, groups, method, OPTS[method])
    with vhf.pruning(model, method, **OPTS[method]) as h, torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == torch.float64
    # Padded as the pruned batch is (Qwen3.5's delta-net layers see the padding: same amount here).
    logits = hand_logits(model, [row for row, _, _ in want], length=out.logits.shape[1])
    for b, (row, _, _) in enumerate(want):
        n = row[0].shape[0]  # rows are left-padded: the last n positions are the prompt's
        assert_close(out.logits[b, -n:], logits[b, -n:], **TOL)
    kept = [k for _, ks, _ in want for k in ks]
    lengths = [n for _, _, ns in want for n in ns]
    assert h.last_lengths == lengths
    assert [kk[0].tolist() for kk in h.last_kept] == kept
    if method in FIXED:
        assert lengths == [6, 4, 6, 6]  # the 2 x 2-unit image keeps all 4 of its merge units
    assert h.last_projected == [int(g.prod()) // 4 for g in batch["image_grid_thw"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_continues_after_the_unpruned_positions(family):
    """generate on the pruned prompt equals greedy decoding by hand on the hand-pruned row, new
    tokens at the unpruned sequence's last position + 1, + 2, ... (all three M-RoPE rows)."""
    model, proc = model_of(family)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, groups)
    steps = 4
    with vhf.pruning(model, "vispruner", keep=3), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    L = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :L], batch["input_ids"])
    eos = model.generation_config.eos_token_id
    hand = rows_alone(model, proc, texts, groups, "vispruner", {"keep": 3})
    for b, ((ids, pos, slots, feats, deeps), _, _) in enumerate(hand):
        # Unpruned, the next position is the largest id + 1 (the model's rope_deltas say so too).
        full = encode(proc, [texts[b]], [groups[b]])
        _, delta = model.model.get_rope_index(full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"],
                                              image_grid_thw=full["image_grid_thw"])
        nxt = full["input_ids"].shape[1] + int(delta)
        assert nxt == int(pos.max()) + 1
        new, extra = [], None
        emb = model.get_input_embeddings()
        for t in range(steps):
            p = pos if extra is None else torch.cat([pos, torch.arange(nxt, nxt + t)[None].expand(3, -1)], dim=1)
            tok = int(hand_logits(model, [(ids, p, slots, feats, deeps)], extra)[0, -1].argmax())
            new.append(tok)
            if tok == eos:
                break
            e = emb(torch.tensor([tok]))
            extra = e if extra is None else torch.cat([extra, e])
        got = out[b, L:].tolist()
        assert got[:len(new)] == new
        assert all(t == proc.tokenizer.pad_token_id for t in got[len(new):])


# ----------------------------------------------------------------------------- against the unpruned model

@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_reproduces_unpruned(family):
    model, proc = model_of(family)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, groups)
    img = model.config.image_token_id
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == img, -100)
    with torch.no_grad():
        want = model(**batch, labels=labels)
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        for method in FIXED:
            with vhf.pruning(model, method, keep=1000) as h:  # more than any image has: all kept
                got = model(**batch, labels=labels)
                out = model.generate(**batch, max_new_tokens=4, do_sample=False)
            assert h.last_lengths == [int(g.prod()) // 4 for g in batch["image_grid_thw"]]
            assert_close(got.logits, want.logits, atol=1e-12, rtol=1e-12)
            assert_close(got.loss, want.loss, atol=1e-12, rtol=1e-12)
            assert torch.equal(out, gen)


def test_generate_options_beams_and_dicts():
    """Beams (rows repeated inside generate: Qwen3-VL's deepstack features follow) and
    return_dict_in_generate behave as unpruned."""
    model, proc = model_of("qwen3_vl")
    texts, groups = ragged_batch()
    batch = encode(proc, texts[:2], groups[:2])
    L = batch["input_ids"].shape[1]
    opts = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        want = model.generate(**batch, **opts)
        with vhf.pruning(model, "vispruner", keep=1000):
            got = model.generate(**batch, **opts)
        assert torch.equal(got, want)
        with vhf.pruning(model, "fopru_rank", keep=2):
            out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
            beams = model.generate(**batch, **opts)
    assert torch.equal(out.sequences[:, :L], batch["input_ids"]) and len(out.logits) == 3
    assert beams.shape[0] == 4 and torch.equal(beams[::2, :L], batch["input_ids"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sample_alone(family, method):
    model, proc = model_of(family)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, groups)
    L = batch["input_ids"].shape[1]
    with vhf.pruning(model, method, **OPTS[method]), torch.no_grad():
        logits = model(**batch).logits[:, -1]
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert torch.equal(out[:, :L], batch["input_ids"])
        for i, (text, imgs) in enumerate(zip(texts, groups)):
            alone = encode(proc, [text], [imgs])
            assert_close(model(**alone).logits[0, -1], logits[i], **BATCH_TOL.get(family, TOL))
            one = model.generate(**alone, max_new_tokens=3, do_sample=False)
            new = one[0, alone["input_ids"].shape[1]:]
            assert torch.equal(out[i, L:L + new.numel()], new)
            assert (out[i, L + new.numel():] == proc.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_videos_pass_through_unpruned(family):
    """A prompt with an image and a video: the image is pruned, the video's tokens are the model's
    own (keep = all: the unpruned model exactly; pruned: the model pruned by hand, video features
    and M-RoPE ids from the model itself)."""
    model, proc = model_of(family)
    vc = model.config.vision_config
    torch.manual_seed(0)
    vgrid = torch.tensor([[2, 4, 6]])  # 2 temporal patches of 4 x 6 patches
    videos = torch.randn(int(vgrid.prod()), 3 * vc.temporal_patch_size * vc.patch_size ** 2, dtype=torch.float64)
    # Qwen2.5-VL: one block for the whole video; Qwen3-VL: one block per temporal patch (the
    # processor lays them out).
    video = "<|video_pad|>" if family == "qwen3_vl" else "<|vision_start|><|video_pad|><|vision_end|>"
    text = f"user : {IMG} and {video} what is this ? assistant :"
    image = picture(7, 100, 150)
    inputs = proc(images=[image], text=[text], video_grid_thw=vgrid)
    inputs["pixel_values_videos"] = videos
    with torch.no_grad():
        want = model(**inputs).logits
        with vhf.pruning(model, "fopru_rank", keep=1000):
            got = model(**inputs).logits
        assert_close(got, want, atol=1e-12, rtol=1e-12)
        with vhf.pruning(model, "fopru_rank", keep=5) as h:
            got = model(**inputs).logits
            # Videos alone: the model's own call.
            only = proc(text=[f"user : {video} ? assistant :"], video_grid_thw=vgrid)
            only["pixel_values_videos"] = videos
            assert torch.equal(model(**only).logits, type(model).forward(model, **only).logits)
        # By hand: the image pruned with the reference, the video's features and deepstack from the
        # model, every position from the model's get_rope_index on the unpruned prompt.
        (tokens, deep, ordinals, kept, _), = hand_images(model, inputs, "fopru_rank", {"keep": 5})
        assert h.last_kept[0][0].tolist() == kept
        ids = inputs["input_ids"][0]
        pos, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"], video_grid_thw=vgrid)
        img = (ids == model.config.image_token_id).nonzero().squeeze(1)
        keep_cols = torch.cat([(ids != model.config.image_token_id).nonzero().squeeze(1), img[ordinals]]).sort().values
        ids_k = ids[keep_cols]
        vout = model.model.get_video_features(videos, vgrid, return_dict=True)
        vfeat = torch.cat(list(vout.pooler_output))
        emb = model.get_input_embeddings()(ids_k[None])
        is_img = ids_k == model.config.image_token_id
        is_vid = ids_k == model.config.video_token_id
        emb = emb.masked_scatter(is_img[None, :, None], tokens).masked_scatter(is_vid[None, :, None], vfeat)
        kw = {}
        if deep:
            vis = is_img | is_vid
            joint = []
            for l, d in enumerate(deep):
                vd = vout.deepstack_features[l]
                vd = torch.cat(list(vd)) if isinstance(vd, (tuple, list)) else vd
                e = torch.zeros(int(vis.sum()), d.shape[-1], dtype=d.dtype)
                e[is_img[vis]] = d
                e[is_vid[vis]] = vd
                joint.append(e)
            kw = dict(visual_pos_masks=vis[None], deepstack_visual_embeds=joint)
        hs = model.model.language_model(inputs_embeds=emb, position_ids=pos[:, :, keep_cols], **kw).last_hidden_state
        assert_close(got[0], model.lm_head(hs)[0], **TOL)


# ----------------------------------------------------------------------------- mechanics

def test_one_tower_run_no_attention_maps_float64(monkeypatch):
    """The tower runs once per pruned call (its own SDPA kernel; no second projection), the score op
    gets the float64 q/k, and remove() gives the model back."""
    model, proc = model_of("qwen2_5_vl")
    texts, groups = ragged_batch()
    batch = encode(proc, texts[:1], groups[:1])
    vis = model.model.visual
    assert vis.config._attn_implementation == "sdpa"
    calls = {}

    def count(name):
        def hook(_m, _a, _o):
            calls[name] = calls.get(name, 0) + 1
        return hook

    hooks = [b.attn.qkv.register_forward_hook(count(f"qkv{i}")) for i, b in enumerate(vis.blocks)]
    hooks.append(vis.merger.register_forward_hook(count("merger")))
    dtypes = []
    real = ops.attention_received_varlen

    def spy(q, k, *a, **kw):
        dtypes.append(q.dtype)
        return real(q, k, *a, **kw)

    monkeypatch.setattr(ops, "attention_received_varlen", spy)
    before = dict(model.__dict__)
    try:
        with torch.no_grad():
            want = model(**batch).logits
            calls.clear()
            with vhf.pruning(model, "prumerge"):
                model(**batch)
            assert all(calls.get(f"qkv{i}") == 1 for i in range(len(vis.blocks))) and calls["merger"] == 1
            assert "permute_input_for_window_attn" not in vis.__dict__  # the window-order probe is gone
            assert torch.equal(model(**batch).logits, want)
    finally:
        for h in hooks:
            h.remove()
    assert dtypes == [torch.float64]
    assert model.__dict__.keys() == before.keys()


def test_errors():
    model, _ = model_of("qwen2_5_vl")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    other = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=1),
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]})))
    with pytest.raises(ValueError, match="Qwen2_5_VLForConditionalGeneration.*got Qwen2VLForConditionalGeneration"):
        vhf.apply_pruning(other, "fopru_rank", keep=4)
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="keep"):
            vhf.apply_pruning(model, "fopru_rank", keep=bad)
    with pytest.raises(ValueError, match="keep"):
        vhf.apply_pruning(model, "vispruner")
    with pytest.raises(ValueError, match="unknown"):
        vhf.apply_pruning(model, "fopru_row", keep=4, knn=3)
    with pytest.raises(ValueError, match="unknown method"):
        vhf.apply_pruning(model, "random", keep=4)
    with pytest.raises(ValueError, match="per_sample"):
        vhf.apply_pruning(model, "prumerge", per_sample=False)
    assert "forward" not in model.__dict__  # failed calls leave nothing behind
    # A large keep is fine on Qwen: images with fewer merge units keep them all.
    with vhf.pruning(model, "fopru_rank", keep=10 ** 6):
        pass
    texts, groups = ragged_batch()
    batch = encode(model_of("qwen2_5_vl")[1], texts[:1], groups[:1])
    batch.pop("image_grid_thw")
    with vhf.pruning(model, "fopru_rank", keep=4), pytest.raises(ValueError, match="image_grid_thw"):
        model(**batch)


def test_register_method_extension_point():
    """A method living elsewhere (GlimpsePrune's pattern) registers itself by name; hf hands it the
    model and the checked options, and never imports it."""
    from vtkernels.hf import handle as hf_handle
    model, _ = model_of("qwen2_5_vl")
    seen = []

    class Handle:
        def remove(self):
            seen.append("removed")

    def factory(m, **opts):
        seen.append((m, opts))
        return Handle()

    vhf.register_method("toy_in_llm", factory, {"threshold": 0.5})
    try:
        assert vhf.METHODS["toy_in_llm"] == {"threshold": 0.5}
        with vhf.pruning(model, "toy_in_llm", threshold=0.7):
            pass
        assert seen == [(model, {"threshold": 0.7}), "removed"]
        with pytest.raises(ValueError, match="unknown"):
            vhf.apply_pruning(model, "toy_in_llm", keep=3)
        with pytest.raises(ValueError, match="built in"):
            vhf.register_method("vispruner", factory, {})
    finally:
        vhf.METHODS.pop("toy_in_llm", None)
        hf_handle._METHOD_FACTORIES.pop("toy_in_llm", None)
    import importlib.util
    if importlib.util.find_spec("vtkernels.glimpse") is None:
        # Not on this branch yet: named, and why.
        with pytest.raises(ValueError, match="vtkernels.glimpse"):
            vhf.apply_pruning(model, "glimpse")


def test_lower_precision_runs():
    model, proc = model_of("qwen3_vl")
    m = copy.deepcopy(model).to(torch.bfloat16)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, groups)
    for method in METHODS:
        with vhf.pruning(m, method, **OPTS[method]), torch.no_grad():
            out = m.generate(**batch, max_new_tokens=2, do_sample=False)
        assert out.shape == (3, batch["input_ids"].shape[1] + 2)


# ----------------------------------------------------------------------------- CUDA (GPU lane)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cuda_end_to_end(family):
    """On the GPU (vtk CUDA/Triton kernels): keep = all equals the unpruned model, every method runs
    through generate and returns the caller's prompt; float32 and bf16."""
    model, proc = tiny_qwen(family, seed=SEEDS[family])
    model = model.cuda()
    texts, groups = ragged_batch()
    batch = encode(proc, texts, groups).to("cuda")
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        want = model(**batch).logits
        with vhf.pruning(model, "fopru_rank", keep=1000):
            got = model(**batch).logits
        mask = batch["attention_mask"].bool()
        assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
        for dtype in (torch.float32, torch.bfloat16):
            m = model.to(dtype)
            for method in METHODS:
                with vhf.pruning(m, method, **OPTS[method]):
                    out = m.generate(**batch, max_new_tokens=3, do_sample=False)
                assert torch.equal(out[:, :L], batch["input_ids"]) and out.shape[0] == 3
