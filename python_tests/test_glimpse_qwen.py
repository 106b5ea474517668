"""vtkernels.glimpse (GlimpsePrune) on small Qwen2.5-VL models with random weights, built offline.

Float64 throughout. The hand reference written here from ALGORITHMS.md: the tower's block outputs
(hooks), pooled per merge unit and put back in raster order with a window layout built by hand
(test_hf_qwen.tower_layout); M-RoPE ids from the grids by hand; layers 0..K on prompt + glimpse
(the glimpse at the last position + 1 in all three rows); the glimpse row of layer K recomputed
from that layer's input with M-RoPE angles built here (raw logits: Qwen2.5-VL); the VIP per image
on its merged grid as the text states it (test_glimpse.ref_vip); layers K+1.. on the kept tokens
with their original (t, row, col) ids; greedy decoding as a cache-free loop at last + 1, + 2, ...
Runs on the latest transformers and on 5.17.
"""
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import vtkernels.hf as vhf
from vtkernels.cli import tiny_llava, tiny_qwen
from vtkernels.glimpse import GlimpseHead, apply_glimpse
from test_glimpse import ref_keep, ref_rms, ref_vip, rotate_pairs
from test_hf_qwen import ragged_batch, tower_layout

TOL = dict(atol=1e-10, rtol=1e-9)
K = 1  # layers 0, 1 on the full sequence; 2, 3 on the kept tokens
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def qwen():
    # 4 vision blocks (full attention in 1 and 3, windows of 2 x 2 units elsewhere), 4 LLM layers
    # with 4 query heads over 2 KV heads.
    model, proc = tiny_qwen("qwen2_5_vl", text_layers=4, seed=21)
    return model.double(), proc


def make_head(model, seed=0, **fields):
    torch.manual_seed(seed)
    head = GlimpseHead.for_model(model, reduce_layer=K, **fields).double()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
    return head.eval()


def encode(proc, texts, images):
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


def one_sample(proc, i):
    texts, groups = ragged_batch()
    return encode(proc, [texts[i]], groups[i])


def split_head(model, proc, seed=0, sample=0, image=0):
    """A head whose last bias puts the boundary halfway between the two middle logits of one image
    of a probe sample: that image keeps about half of its tokens, none on the boundary."""
    head = make_head(model, seed)
    seen = []
    orig = head.predict
    head.predict = lambda A, c, g: seen.append(orig(A, c, g)) or seen[-1]
    with torch.no_grad(), apply_glimpse(model, head):
        model(**one_sample(proc, sample))
    del head.predict
    # Images of one grid go through the VIP together; sample 0's two images differ in size.
    s = seen[image][0].double().sort().values
    mid = s.numel() // 2
    with torch.no_grad():
        head.attn_fuser.attn_out_projs["3"].bias -= (s[mid - 1] + s[mid]) / 2
    return head


def every_third(head):
    """head.predict: +8 at positions p % 3 == 0 of each image, -8 elsewhere (a given subset)."""
    def predict(A, conds, grid):
        out = torch.full(A.shape[:2], -8.0)
        out[:, ::3] = 8.0
        return out
    head.predict = predict
    return lambda N: list(range(0, N, 3))


# ----------------------------------------------------------------------------- hand reference

def hand_positions(model, ids, grid):
    """M-RoPE ids [3, T] of one prompt: text counts up; an image at s gives merge unit (r, c)
    (s, s + r, s + c) and moves the text on by max(rows, cols)."""
    m = model.config.vision_config.spatial_merge_size
    img = model.config.image_token_id
    dims = [(h // m, w // m) for _, h, w in grid.tolist()]
    pos, cur, i, ids = [], 0, 0, ids.tolist()
    while i < len(ids):
        if ids[i] != img:
            pos.append([cur] * 3)
            cur += 1
            i += 1
            continue
        gh, gw = dims.pop(0)
        pos += [[cur, cur + r, cur + c] for r in range(gh) for c in range(gw)]
        cur += max(gh, gw)
        i += gh * gw
    return torch.tensor(pos).T


def hand_angles(model, pos):
    """M-RoPE angles [S, D / 2]: frequency j turns with row t, h or w by the mrope sections. In
    float32, as the model's rotary computes them whatever the model's dtype."""
    tc = model.config.text_config
    D = tc.hidden_size // tc.num_attention_heads
    inv = 1.0 / (tc.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    sec = tc.rope_parameters["mrope_section"]
    which = torch.cat([torch.full((n,), i) for i, n in enumerate(sec)])
    return pos.float().T[:, which] * inv


def run_layer(model, l, x, pos):
    """Decoder layer l on x [1, S, H] at M-RoPE ids pos [3, S], causal in slot order, no cache."""
    lm = model.model.language_model
    S = x.shape[1]
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None]
    out = lm.layers[l](x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, pos[:, None]))
    return out[0] if isinstance(out, tuple) else out


def hand_conditions(model, inputs, blocks):
    """The tower's block outputs, each averaged per merge unit, in raster order: [U, C] per block."""
    vis = model.model.visual
    got = {}
    hooks = [vis.blocks[b].register_forward_hook(lambda _m, _a, out, b=b: got.__setitem__(b, out))
             for b in blocks]
    try:
        vis(inputs["pixel_values"].double(), grid_thw=inputs["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    _, _, units = tower_layout(model, inputs["image_grid_thw"])
    out = []
    for b in blocks:
        x = got[b][0] if isinstance(got[b], tuple) else got[b]
        pooled = x.view(-1, 4, x.shape[-1]).mean(1)
        raster = torch.empty_like(pooled)
        raster[units] = pooled
        out.append(raster)
    return out


def reference(model, head, inputs, decide=None, thr=0.5, min_keep=1, max_ratio=None):
    """One sample, no padding: (logits over the kept sequence, kept positions per image, layer
    inputs at the kept positions, their M-RoPE ids, A per image)."""
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and bool(inputs["attention_mask"].all())
    cfg = model.config
    tc = cfg.text_config
    lm = model.model.language_model
    L, T = len(lm.layers), ids.shape[1]
    Hq, Hkv = tc.num_attention_heads, tc.num_key_value_heads
    D = tc.hidden_size // Hq
    grid = inputs["image_grid_thw"]
    dims = [(h // 2, w // 2) for _, h, w in grid.tolist()]
    feats = model.model.get_image_features(inputs["pixel_values"].double(), grid)
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    conds = hand_conditions(model, inputs, head.selected_visual_layers)
    emb = model.get_input_embeddings()(ids)[0].clone()
    img_pos = (ids[0] == cfg.image_token_id).nonzero().squeeze(1)
    emb[img_pos] = feats
    E = head.learnable_embeddings[:, 0]
    g = ref_rms(E @ head.le_proj.weight.T + head.le_proj.bias, head.le_norm.weight, tc.rms_norm_eps)

    pos = hand_positions(model, ids[0], grid)
    pos = torch.cat([pos, torch.full((3, 1), int(pos.max()) + 1)], dim=1)  # the glimpse: last + 1
    x = torch.cat([emb, g[:1]])[None]
    inputs_at = []
    for l in range(K + 1):
        if l > 0:
            x = x.clone()
            x[0, -1] += g[l]
        inputs_at.append(x)
        x = run_layer(model, l, x, pos)
    attn = lm.layers[K].self_attn
    hk = lm.layers[K].input_layernorm(inputs_at[K])
    q = attn.q_proj(hk)[0, -1].view(Hq, D)
    k = attn.k_proj(hk)[0].view(T + 1, Hkv, D)
    ang = hand_angles(model, pos)
    q = rotate_pairs(q, ang[-1])
    k = rotate_pairs(k, ang[:, None, :])
    row = torch.stack([k[:, h // (Hq // Hkv)] @ q[h] for h in range(Hq)]) / math.sqrt(D)  # raw logits
    A_all = row[:, img_pos].T
    As, kept, off = [], [], 0
    for i, (gh, gw) in enumerate(dims):
        n = gh * gw
        A = A_all[off:off + n]
        As.append(A)
        if decide is None:
            kept.append(ref_keep(ref_vip(head, A, [c[off:off + n] for c in conds], gh, gw).tolist(),
                                 thr, min_keep, max_ratio))
        else:
            kept.append(decide(n))
        off += n
    starts = np.cumsum([0] + [gh * gw for gh, gw in dims])
    keep = sorted(set(range(T)) - set(img_pos.tolist())
                  | {int(img_pos[starts[i] + j]) for i in range(len(dims)) for j in kept[i]})
    prefix = [inp[0, keep] for inp in inputs_at] + [x[0, keep]]
    y, kpos = x[:, keep], pos[:, keep]
    for l in range(K + 1, L):
        y = run_layer(model, l, y, kpos)
        if l < L - 1:
            prefix.append(y[0])
    return model.lm_head(lm.norm(y))[0], kept, prefix, kpos, As


def reference_generate(model, logits, prefix, kpos, n_new, eos):
    """Greedy decoding without a cache, new tokens at the last original position + 1, + 2, ...
    in all three rows."""
    lm = model.model.language_model
    nxt = int(kpos.max()) + 1
    tok = int(logits[-1].argmax())
    new = []
    while len(new) < n_new:
        new.append(tok)
        if tok == eos:
            break
        x = model.get_input_embeddings()(torch.tensor([new]))
        npos = torch.arange(nxt, nxt + len(new)).expand(3, -1)
        for l in range(len(lm.layers)):
            full = torch.cat([prefix[l][None], x], dim=1)
            x = run_layer(model, l, full, torch.cat([kpos, npos], dim=1))[:, prefix[l].shape[0]:]
        tok = int(model.lm_head(lm.norm(x))[0, -1].argmax())
    return new


# ----------------------------------------------------------------------------- the reference is real

def test_hand_positions_and_angles_are_the_models(qwen):
    model, proc = qwen
    inputs = one_sample(proc, 0)
    pos, _ = model.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                        mm_token_type_ids=inputs["mm_token_type_ids"],
                                        attention_mask=inputs["attention_mask"])
    want = hand_positions(model, inputs["input_ids"][0], inputs["image_grid_thw"])
    assert torch.equal(pos[:, 0], want)
    lm = model.model.language_model
    x = torch.zeros(1, want.shape[1], 4, dtype=torch.float64)
    cos, sin = lm.rotary_emb(x, want[:, None])
    ang = hand_angles(model, want)
    assert_close(cos[0], torch.cat([ang, ang], -1).cos().double(), **TOL)
    assert_close(sin[0], torch.cat([ang, ang], -1).sin().double(), **TOL)


# ----------------------------------------------------------------------------- inference

def test_keep_all_reproduces_the_unpruned_model(qwen):
    model, proc = qwen
    head = make_head(model)
    with torch.no_grad():
        head.attn_fuser.attn_out_projs["3"].bias.fill_(1e4)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, [im for g in groups for im in g])
    assert not batch["attention_mask"].all()
    with torch.no_grad():
        want = model(**batch).logits
        want_gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        with apply_glimpse(model, head) as h:
            got = model(**batch).logits
            dims = [(h_ // 2) * (w // 2) for _, h_, w in batch["image_grid_thw"].tolist()]
            assert h.last_lengths == dims and len(set(dims)) == 4
            got_gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    # Padded rows: the kept sequence is the attended tokens, left-padded to the longest.
    mask = batch["attention_mask"].bool()
    M = got.shape[1]
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        assert_close(got[b, M - n:], want[b, mask[b]], atol=1e-12, rtol=1e-12)
    assert torch.equal(got_gen, want_gen)


def test_given_subset_matches_the_hand_reference(qwen):
    model, proc = qwen
    head = make_head(model, seed=1)
    inputs = one_sample(proc, 0)  # two images of different sizes
    with torch.no_grad():
        decide = every_third(head)
        want, kept, prefix, kpos, _ = reference(model, head, inputs, decide=decide)
        with apply_glimpse(model, head) as h:
            out = model(**inputs)
            assert [k[0].tolist() for k in h.last_kept] == kept
            gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert_close(out.logits[0], want, **TOL)
    new = reference_generate(model, want, prefix, kpos, 6, model.generation_config.eos_token_id)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(gen[0, :T], inputs["input_ids"][0])
    assert gen[0, T:T + len(new)].tolist() == new


def test_vip_decision_matches_the_hand_reference(qwen):
    model, proc = qwen
    counts = []
    for sample, image in [(0, 0), (0, 1), (2, 0)]:
        head = split_head(model, proc, seed=2, sample=sample, image=image)
        inputs = one_sample(proc, sample)
        seen = []
        orig = head.predict
        head.predict = lambda A, c, g: seen.append(A) or orig(A, c, g)
        with torch.no_grad():
            want, kept, prefix, kpos, As = reference(model, head, inputs)
            with apply_glimpse(model, head) as h:
                out = model(**inputs)
                got_kept = [k[0].tolist() for k in h.last_kept]
                gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        # glimpse_logits returns float32: the row at float32 resolution.
        assert_close(torch.cat([a.reshape(-1, a.shape[-1]) for a in seen[:len(As)]]).double(), torch.cat(As),
                     atol=1e-5, rtol=1e-5)
        assert got_kept == kept
        counts.append(len(kept[image]))
        assert_close(out.logits[0], want, **TOL)
        new = reference_generate(model, want, prefix, kpos, 5, model.generation_config.eos_token_id)
        T = inputs["input_ids"].shape[1]
        assert gen[0, T:T + len(new)].tolist() == new
    sizes = [20, 4, 15]  # merge units of the split images: (0, 0) 4 x 5, (0, 1) 2 x 2, (2, 0) 5 x 3
    assert all(0 < n < s for n, s in zip(counts, sizes))  # real subsets


def test_batch_equals_each_sample_alone(qwen):
    model, proc = qwen
    head = split_head(model, proc, seed=2, sample=2)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, [im for g in groups for im in g])
    T = batch["input_ids"].shape[1]
    with torch.no_grad(), apply_glimpse(model, head) as h:
        out = model(**batch, use_cache=False)
        kept = [k[0].tolist() for k in h.last_kept]
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        j = 0
        M = out.logits.shape[1]
        for i, (text, imgs) in enumerate(zip(texts, groups)):
            alone = encode(proc, [text], imgs)
            one = model(**alone).logits[0]
            assert [k[0].tolist() for k in h.last_kept] == kept[j:j + len(imgs)]
            assert_close(out.logits[i, M - one.shape[0]:], one, **TOL)
            g1 = model.generate(**alone, max_new_tokens=5, do_sample=False)
            new = g1[0, alone["input_ids"].shape[1]:]
            assert torch.equal(gen[i, T:T + new.numel()], new)
            j += len(imgs)
    assert len({len(k) for k in kept}) > 1  # per-sample counts differ
    assert torch.equal(gen[:, :T], batch["input_ids"])


def test_manual_decoding_and_rope_deltas(qwen):
    # A cache from forward decodes like generate, through the wrapper and through the model's own
    # fallback (rope_deltas, no position ids or mask given: one unpadded row).
    model, proc = qwen
    head = split_head(model, proc, seed=2, sample=1)
    inputs = one_sample(proc, 1)
    T = inputs["input_ids"].shape[1]
    with torch.no_grad(), apply_glimpse(model, head) as h:
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for through_wrapper in (True, False):
            out = model(**inputs)
            cache_kw = "cache" if "cache" in out else "past_key_values"
            cache = out[cache_kw]
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = [tok]
            for step in range(2):
                if through_wrapper:
                    mask = torch.ones(1, T + step + 1, dtype=torch.long)
                    o = model(input_ids=tok, attention_mask=mask, **{cache_kw: cache})
                else:  # the class's own forward: positions = cache length + rope_deltas
                    o = type(model).forward(model, input_ids=tok, **{cache_kw: cache})
                tok = o.logits[:, -1].argmax(-1, keepdim=True)
                seq.append(tok)
            assert torch.equal(torch.cat(seq, 1)[0], gen[0, T:]), through_wrapper


def test_hf_entry_point_save_and_load(qwen, tmp_path):
    model, proc = qwen
    head = split_head(model, proc, seed=3, sample=0)
    inputs = one_sample(proc, 0)
    with torch.no_grad():
        with vhf.apply_pruning(model, method="glimpse", head=head) as h:
            want = model(**inputs).logits
            kept = h.last_kept
        head.save_pretrained(tmp_path)
        loaded = GlimpseHead.from_pretrained(tmp_path, model=model)
        assert loaded.use_attention_logits and loaded.selected_visual_layers == head.selected_visual_layers
        with vhf.apply_pruning(model, method="glimpse", head=str(tmp_path)) as h:
            got = model(**inputs).logits
            assert [k[0].tolist() for k in h.last_kept] == [k[0].tolist() for k in kept]
    assert_close(got, want, atol=0, rtol=0)


def test_default_conditions_are_the_full_attention_blocks():
    # Published: blocks 31, 23, 15, 7 of the 32-block tower; a 4-block tower: 3, 2, 1, 0.
    model, _ = tiny_qwen("qwen2_5_vl", vision_depth=8, text_layers=3, seed=0)
    head = GlimpseHead.for_model(model)
    assert head.selected_visual_layers == [7, 5, 3, 1]
    assert head.reduce_layer == 2 and head.use_attention_logits  # round(2/3 * 3); raw logits
    cfg = model.config.to_dict()
    cfg["vision_config"]["depth"] = 32
    cfg["text_config"].update(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28)
    h7 = GlimpseHead.for_model(cfg)
    assert h7.selected_visual_layers == [31, 23, 15, 7] and h7.reduce_layer == 18


def test_errors(qwen):
    model, proc = qwen
    head = make_head(model)
    inputs = one_sample(proc, 1)
    with torch.no_grad(), apply_glimpse(model, head):
        args = dict(inputs)
        args.pop("image_grid_thw")
        with pytest.raises(ValueError, match="image_grid_thw"):
            model(**args)
        with pytest.raises(ValueError, match="videos"):
            model(**inputs, pixel_values_videos=torch.zeros(4, 1176), video_grid_thw=torch.tensor([[1, 2, 2]]))
        bad = dict(inputs)  # one placeholder short of the image's merge units
        ids = bad["input_ids"][0]
        drop = int((ids == model.config.image_token_id).nonzero()[0])
        keep = torch.arange(ids.numel()) != drop
        for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
            bad[name] = bad[name][:, keep]
        with pytest.raises(ValueError, match="image tokens"):
            model(**bad)
    llava, _ = tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=4,
                          vision_heads=4, text_hidden=64, text_layers=4, seed=1)
    with pytest.raises(ValueError, match="another model"):
        apply_glimpse(model, GlimpseHead.for_model(llava, reduce_layer=K))
    q3, _ = tiny_qwen("qwen3_vl", text_layers=2, seed=0)
    with pytest.raises(ValueError, match="Qwen2_5_VLForConditionalGeneration"):
        apply_glimpse(q3, make_head(model))
    assert "forward" not in model.__dict__


def test_lower_precision_runs():
    model, proc = tiny_qwen("qwen2_5_vl", text_layers=4, seed=21)
    inputs = one_sample(proc, 0)
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        head = GlimpseHead.for_model(m, reduce_layer=K)
        with torch.no_grad(), apply_glimpse(m, head) as h:
            out = m.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert out.shape[1] <= inputs["input_ids"].shape[1] + 3
            assert all(n >= 1 for n in h.last_lengths)


def test_prefill_flops(qwen):
    from torch.utils.flop_counter import FlopCounterMode

    from vtkernels import flops
    from vtkernels.glimpse import prefill_flops
    model, proc = qwen
    cfg = model.config
    inputs = one_sample(proc, 0)
    grids = inputs["image_grid_thw"]
    n_image = int((inputs["input_ids"] == cfg.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_image
    head = make_head(model)
    f = prefill_flops(model, n_text, n_image, kept=7, head=head, grids=grids)
    base = flops.qwen_prefill_flops(cfg, grids, n_image, n_text)
    assert math.isclose(f.vision, base.vision) and math.isclose(f.projector, base.projector)  # whole tower
    L = cfg.text_config.num_hidden_layers
    every = prefill_flops(model, n_text, n_image, kept=n_image, reduce_layer=L - 1, grids=grids)
    assert math.isclose(every.language_full + every.language_pruned,
                        flops.qwen_prefill_flops(cfg, grids, n_image + 1, n_text).language)
    assert f.language < every.language
    # The VIP term against torch's FLOP counter, image by image (grids differ).
    Hq, C = cfg.text_config.num_attention_heads, cfg.vision_config.hidden_size
    counted = 0
    for _, h, w in grids.tolist():
        r, c = h // 2, w // 2
        A = torch.zeros(1, r * c, Hq, dtype=torch.float64)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            head.predict(A, [torch.zeros(1, r * c, C, dtype=torch.float64)] * 4, (r, c))
        counted += fc.get_total_flops()
    assert f.vip == counted
    with pytest.raises(ValueError, match="grids"):
        prefill_flops(model, n_text, n_image, kept=7)


def test_published_layout_with_a_flat_config_loads_and_prunes(qwen, tmp_path):
    # Published Qwen2.5-VL checkpoints come from transformers 4.51, whose config.json holds the
    # language model's fields at the top level (no text_config).
    import json
    model, proc = qwen
    head = split_head(model, proc, seed=4, sample=2)
    cfg = model.config.to_dict()
    text = cfg.pop("text_config")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
              "vocab_size"):
        cfg[k] = text[k]
    cfg["model_type"] = "qwen2_5_vl"
    cfg.update({k: head.config[k] for k in ("reduce_layer", "selected_layers", "selected_visual_layers",
                                            "attn_fuse_size", "visual_cond_size", "attn_fuse_num_heads",
                                            "reduce_threshold", "min_remain_num", "max_remain_ratio",
                                            "use_attention_logits", "le_length", "le_layers")})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {k: ({n: t.float() for n, t in v.items()} if isinstance(v, dict) else v.float())
             for k, v in head.published_state().items()}
    torch.save(state, tmp_path / "new_modules_gp.pt")
    loaded = GlimpseHead.from_pretrained(tmp_path, model=model)
    assert next(loaded.parameters()).dtype == torch.float64  # cast to the model's dtype
    inputs = one_sample(proc, 2)
    with torch.no_grad():
        with apply_glimpse(model, head) as h:
            model(**inputs)
            want = [k[0].tolist() for k in h.last_kept]
        with apply_glimpse(model, str(tmp_path)) as h:
            model(**inputs)
            assert [k[0].tolist() for k in h.last_kept] == want
    del state["attn_fuser"]["layers.2.attn.q_proj.weight"]
    torch.save(state, tmp_path / "new_modules_gp.pt")
    with pytest.raises(ValueError, match="layers.2.attn.q_proj.weight"):
        GlimpseHead.from_pretrained(tmp_path, model=model)


def test_generate_options_beams_and_returned_sequences(qwen):
    model, proc = qwen
    head = split_head(model, proc, seed=2, sample=0)
    texts, groups = ragged_batch()
    batch = encode(proc, texts[:2], [im for g in groups[:2] for im in g])
    T = batch["input_ids"].shape[1]
    with torch.no_grad(), apply_glimpse(model, head):
        d = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                           output_scores=True, output_logits=True)
        plain = model.generate(**batch, max_new_tokens=3, do_sample=False)
        beams = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
        many = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    assert torch.equal(d.sequences, plain) and len(d.scores) == 3 and len(d.logits) == 3
    assert torch.equal(beams[:, :T], batch["input_ids"]) and beams.shape[1] <= T + 3
    assert many.shape[0] == 4 and torch.equal(many[::2, :T], batch["input_ids"])


def test_broken_checkpoint_files_are_clear_errors(qwen, tmp_path):
    model, _ = qwen
    make_head(model).save_pretrained(tmp_path)
    good = (tmp_path / "new_modules_gp.pt").read_bytes()
    (tmp_path / "new_modules_gp.pt").write_bytes(good[:100])
    with pytest.raises(ValueError, match="new_modules_gp.pt is not a readable"):
        GlimpseHead.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not readable JSON"):
        GlimpseHead.from_pretrained(tmp_path)
