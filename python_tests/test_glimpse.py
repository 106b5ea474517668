"""vtkernels.glimpse (GlimpsePrune) on small LLaVA-1.5 models with random weights, built offline.

The models run in float64. Every pruned result is compared with a reference written out plainly
here from ALGORITHMS.md: layers 0..K on the prompt + glimpse, the glimpse row of layer K
recomputed from that layer's input, the VIP as the text states it (heads, rotary pairs and the
keep rule spelled out by hand), layers K+1.. on the kept tokens at their original positions, and
decoding as a loop that runs every layer on [kept prompt states, new tokens] without a cache.
Runs on the latest transformers and on 5.17.
"""
import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

from vtkernels.cli import tiny_llava
from vtkernels.glimpse import GlimpseHead, apply_glimpse, keep_mask, prefill_flops
from vtkernels.glimpse import head as ghead
from pictures import picture

TOL = dict(atol=1e-10, rtol=1e-9)  # float64 end to end
K = 1  # reduce layer of the test heads: layers 0, 1 full; 2, 3 on the kept tokens


@pytest.fixture(scope="module")
def llava():
    # 112 px / 14 = 8 x 8 patches; 4 tower layers, 4 LLM layers (4 query heads over 2 KV heads).
    model, proc = tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=4,
                             vision_heads=4, text_hidden=64, text_layers=4, seed=1)
    return model.double(), proc


def make_head(model, seed=0, **fields):
    torch.manual_seed(seed)
    head = GlimpseHead.for_model(model, reduce_layer=K, **fields).double()
    with torch.no_grad():  # non-trivial norms, so a wrong key or a skipped norm shows
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name:
                p.add_(torch.rand_like(p) * 0.5)
    return head.eval()


def split_head(model, proc, seed=0, sample=None, image=-1):
    """A head whose last bias puts the decision boundary halfway between the two middle logits of
    one image of a probe (the ragged batch, or one sample of it): that image keeps about half of
    its tokens, and no token sits on the boundary. (Random VIP logits vary far less within an
    image than between prompts, so the other images keep all or min_keep of theirs.)"""
    head = make_head(model, seed)
    texts, groups = ragged_batch()
    probe = (encode(proc, texts, [im for g in groups for im in g]) if sample is None
             else encode(proc, [texts[sample]], groups[sample]))
    seen = []
    orig = head.predict
    head.predict = lambda A, c, g: seen.append(orig(A, c, g)) or seen[-1]
    with torch.no_grad(), apply_glimpse(model, head):
        model(**probe)
    del head.predict
    s = seen[0][image].double().sort().values
    mid = s.numel() // 2
    with torch.no_grad():
        head.attn_fuser.attn_out_projs["3"].bias -= (s[mid - 1] + s[mid]) / 2
    return head


def encode(proc, texts, images):
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


def ragged_batch():
    """Prompts of different lengths (left padding); the first holds two images."""
    texts = ["user : <image> <image> which one shows a tree ? assistant :",
             "user : <image> what ? assistant :",
             "user : <image> how many windows are there in the house ? assistant :"]
    images = [picture(3, 80, 80), picture(4, 100, 60), picture(5, 70, 140), picture(6, 120, 90)]
    return texts, [images[:2], images[2:3], images[3:]]


def one_sample(proc, i=2):
    texts, groups = ragged_batch()
    return encode(proc, [texts[i]], groups[i])


# ----------------------------------------------------------------------------- hand reference

def rotate_pairs(x, ang):
    """Rotate-half RoPE written out as pairs (j, j + d/2) rotated by ang[j]: x [..., d], ang [..., d/2]."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    c, s = ang.cos(), ang.sin()
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def ref_rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_vip(head, A, conds, rows, cols):
    """The VIP of ALGORITHMS.md step 3 for ONE image: A [N, Hq], conds [N, C] deepest first."""
    sd = head.attn_fuser.state_dict()

    def lin(x, name, bias=True):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if bias else y

    N = A.shape[0]
    r = torch.tensor([t // cols for t in range(N)], dtype=torch.float64)
    c = torch.tensor([t % cols for t in range(N)], dtype=torch.float64)
    f = torch.tensor([10000.0 ** (-2 * j / 96) for j in range(48)], dtype=torch.float64)
    ang = torch.cat([r[:, None] * f, c[:, None] * f], dim=1)  # [N, 96]: one angle per rotated pair
    h = lin(A, "attn_in_proj")
    for i in range(4):
        ci = lin(conds[i], f"cond_in_projs.{i}")
        x = ref_rms(h, sd[f"layers.{i}.norm1.weight"], 1e-6)
        u = torch.cat([x, ci], dim=1)
        q = lin(u, f"layers.{i}.attn.q_proj", False)
        k = lin(u, f"layers.{i}.attn.k_proj", False)
        v = lin(x, f"layers.{i}.attn.v_proj", False)
        heads = []
        for hd in range(4):
            qh = rotate_pairs(q[:, hd * 192:(hd + 1) * 192], ang)
            kh = rotate_pairs(k[:, hd * 192:(hd + 1) * 192], ang)
            p = torch.softmax(qh @ kh.T / math.sqrt(192), dim=1)
            heads.append(p @ v[:, hd * 64:(hd + 1) * 64])
        h = h + lin(torch.cat(heads, dim=1), f"layers.{i}.attn.o_proj", False)
        x = ref_rms(h, sd[f"layers.{i}.norm2.weight"], 1e-6)
        gate = lin(x, f"layers.{i}.mlp.gate_proj")
        h = h + lin(gate * torch.sigmoid(gate) * lin(x, f"layers.{i}.mlp.up_proj"), f"layers.{i}.mlp.down_proj")
    return lin(h, "attn_out_projs.3")[:, 0]


def ref_keep(logits, thr, min_keep, max_ratio):
    """Step 4 for one image, as a list of kept positions (ascending)."""
    N = len(logits)
    order = sorted(range(N), key=lambda i: (-logits[i], i))
    kept = [i for i in range(N) if 1 / (1 + math.exp(-logits[i])) > thr]
    if max_ratio is not None and len(kept) > int(max_ratio * N):
        kept = order[:int(max_ratio * N)]
    if len(kept) < min_keep:
        kept = set(kept) | set(order[:min_keep])
    return sorted(kept)


def run_layer(model, l, x, pos):
    """Decoder layer l on x [1, S, H] at positions pos [1, S], causal in slot order, no cache."""
    lm = model.model.language_model
    S = x.shape[1]
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None]
    out = lm.layers[l](x, attention_mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
    return out[0] if isinstance(out, tuple) else out


def reference(model, head, inputs, decide=None, thr=0.5, min_keep=1, max_ratio=None):
    """One sample (no padding). Returns logits over the kept sequence, the kept positions per
    image, the layer inputs at the kept positions (for decoding), their positions, and A."""
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and bool(inputs["attention_mask"].all())
    cfg = model.config
    lm = model.model.language_model
    L, T = len(lm.layers), ids.shape[1]
    Hq, Hkv = cfg.text_config.num_attention_heads, cfg.text_config.num_key_value_heads
    D = cfg.text_config.hidden_size // Hq
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    feats = model.model.multi_modal_projector(hs[cfg.vision_feature_layer][:, 1:])
    n, N = feats.shape[:2]
    conds = [hs[i][:, 1:] for i in head.selected_visual_layers]
    emb = model.get_input_embeddings()(ids)[0].clone()
    img_pos = (ids[0] == cfg.image_token_id).nonzero().squeeze(1)
    emb[img_pos] = feats.reshape(n * N, -1)
    E = head.learnable_embeddings[:, 0]
    g = ref_rms(E @ head.le_proj.weight.T + head.le_proj.bias, head.le_norm.weight, cfg.text_config.rms_norm_eps)

    x = torch.cat([emb, g[:1]])[None]
    pos = torch.arange(T + 1)[None]  # the glimpse at the last position + 1
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
    inv = 1.0 / (cfg.text_config.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos[0].double()[:, None] * inv  # [T + 1, D / 2]
    q = rotate_pairs(q, ang[-1])
    k = rotate_pairs(k, ang[:, None, :])
    row = torch.stack([k[:, h // (Hq // Hkv)] @ q[h] for h in range(Hq)]) / math.sqrt(D)  # [Hq, T + 1]
    A = torch.log_softmax(row, dim=1)[:, img_pos].T.reshape(n, N, Hq)
    if decide is None:
        kept = [ref_keep(ref_vip(head, A[i], [c[i] for c in conds], grid, grid).tolist(), thr, min_keep, max_ratio)
                for i in range(n)]
    else:
        kept = decide(A)
    keep = sorted([t for t in range(T) if t not in set(img_pos.tolist())]
                  + [int(img_pos[i * N + j]) for i in range(n) for j in kept[i]])
    prefix = [inp[0, keep] for inp in inputs_at] + [x[0, keep]]
    y, kpos = x[:, keep], pos[:, keep]
    for l in range(K + 1, L):
        y = run_layer(model, l, y, kpos)
        if l < L - 1:
            prefix.append(y[0])
    logits = model.lm_head(lm.norm(y))[0]
    return logits, kept, prefix, kpos, A


def reference_generate(model, logits, prefix, kpos, n_new, eos):
    """Greedy decoding without a cache: every step runs each layer l on [kept prompt's input of
    layer l, the new tokens so far] at [original positions, last + 1, ...] and keeps the new rows."""
    lm = model.model.language_model
    nxt = int(kpos.max()) + 1
    tok = int(logits[-1].argmax())
    new = []
    while len(new) < n_new:
        new.append(tok)
        if tok == eos:
            break
        x = model.get_input_embeddings()(torch.tensor([new]))
        npos = torch.arange(nxt, nxt + len(new))[None]
        for l in range(len(lm.layers)):
            full = torch.cat([prefix[l][None], x], dim=1)
            x = run_layer(model, l, full, torch.cat([kpos, npos], dim=1))[:, prefix[l].shape[0]:]
        tok = int(model.lm_head(lm.norm(x))[0, -1].argmax())
    return new


def given_subsets(n_images, N):
    """Kept positions per image for the 'given subset' tests: different sizes, not contiguous."""
    return [sorted({(7 * i + 3 * j) % N for j in range(5 + 4 * i)}) for i in range(n_images)]


def force(head, kept_per_image, N):
    """Makes head.predict return +8 at the given positions and -8 elsewhere (image by image)."""
    def predict(A, conds, grid):
        out = torch.full((A.shape[0], N), -8.0)
        for i in range(A.shape[0]):
            out[i, kept_per_image[i]] = 8.0
        return out
    head.predict = predict


# ----------------------------------------------------------------------------- keep rule

def test_keep_rule_threshold_cap_min_keep_ties():
    lg = torch.tensor([[0.3, -1.0, 2.0, 0.0, 0.3, 5.0, -3.0, 0.3]])
    # threshold: sigmoid > t, strictly (logit 0 at t = 0.5 is dropped)
    assert keep_mask(lg)[0].nonzero().squeeze(1).tolist() == [0, 2, 4, 5, 7]
    assert keep_mask(lg, threshold=0.9)[0].nonzero().squeeze(1).tolist() == [5]
    # cap int(0.4 * 8) = 3: the best three, 5, 2, then the first of the tied 0.3s
    assert keep_mask(lg, max_ratio=0.4)[0].nonzero().squeeze(1).tolist() == [0, 2, 5]
    # min_keep tops up from the ranking (ties: lower position first)
    assert keep_mask(lg, threshold=0.999, min_keep=3)[0].nonzero().squeeze(1).tolist() == [0, 2, 5]
    # cap 0 (int(0.1 * 8)): min_keep decides
    assert keep_mask(lg, max_ratio=0.1, min_keep=2)[0].nonzero().squeeze(1).tolist() == [2, 5]
    assert keep_mask(lg, max_ratio=0.1, min_keep=0)[0].sum() == 0
    # min_keep above N keeps all; NaN ranks last and never passes the threshold
    nan = torch.tensor([[float("nan"), 1.0, -1.0]])
    assert keep_mask(nan, threshold=0.9, min_keep=2)[0].tolist() == [False, True, True]
    assert keep_mask(nan, min_keep=9)[0].all()


def test_keep_rule_matches_the_written_rule_on_random_logits():
    g = torch.Generator().manual_seed(0)
    lg = (torch.randn(40, 37, generator=g) * 2).round(decimals=1)  # rounding makes ties
    for thr, mk, mr in [(0.5, 1, None), (0.3, 4, 0.2), (0.8, 10, 0.5), (0.6, 0, 1.0), (0.5, 3, 0.05)]:
        got = keep_mask(lg, thr, mk, mr)
        for i in range(lg.shape[0]):
            assert got[i].nonzero().squeeze(1).tolist() == ref_keep(lg[i].tolist(), thr, mk, mr), (thr, mk, mr, i)


@pytest.mark.parametrize("bad", [dict(threshold=0.0), dict(threshold=1.0), dict(threshold=1.5),
                                 dict(threshold=-0.2), dict(max_ratio=0.0), dict(max_ratio=1.5),
                                 dict(max_ratio=-1), dict(min_keep=-1), dict(min_keep=1.5)])
def test_bad_options(llava, bad):
    model, _ = llava
    head = make_head(model)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        apply_glimpse(model, head, **bad)
    with pytest.raises(ValueError, match=name):
        keep_mask(torch.zeros(1, 4), **{"threshold": 0.5, "min_keep": 1, "max_ratio": None, **bad})
    assert "forward" not in model.__dict__


# ----------------------------------------------------------------------------- the VIP

def test_vip_matches_the_written_definition(llava):
    model, _ = llava
    head = make_head(model, seed=3)
    g = torch.Generator().manual_seed(1)
    n, N, Hq, C = 2, 64, 4, 32
    A = torch.randn(n, N, Hq, generator=g, dtype=torch.float64)
    conds = [torch.randn(n, N, C, generator=g, dtype=torch.float64) for _ in range(4)]
    got = head.predict(A, conds, (8, 8))
    assert got.dtype == torch.float32 and got.shape == (n, N)
    # float32 output of a float64 head: compare at float32 resolution
    for i in range(n):
        assert_close(got[i].double(), ref_vip(head, A[i], [c[i] for c in conds], 8, 8), atol=1e-5, rtol=1e-6)
    # a non-square grid (rows != cols) goes through the same rotary
    got = head.attn_fuser(A[:, :48], [c[:, :48] for c in conds], (6, 8))
    assert_close(got[0].double(), ref_vip(head, A[0, :48], [c[0, :48] for c in conds], 6, 8), atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------- inference

def test_keep_all_reproduces_the_unpruned_model(llava):
    model, proc = llava
    head = make_head(model)
    with torch.no_grad():
        head.attn_fuser.attn_out_projs["3"].bias.fill_(1e4)  # every token passes the threshold
    texts, groups = ragged_batch()
    same = encode(proc, ["user : <image> what is this one ? assistant :",
                         "user : <image> where is the sun ? assistant :"], [picture(1, 90, 120), picture(2, 130, 100)])
    assert same["attention_mask"].all()
    batch = encode(proc, texts, [im for g in groups for im in g])
    with torch.no_grad():
        want = model(**same).logits
        want_gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        with apply_glimpse(model, head) as h:
            got = model(**same).logits
            assert h.last_lengths == [64, 64]
            got_gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.equal(got_gen, want_gen)


def test_given_subset_matches_the_hand_reference(llava):
    model, proc = llava
    head = make_head(model, seed=1)
    inputs = one_sample(proc, 0)  # two images
    kept = given_subsets(2, 64)
    with torch.no_grad():
        want, _, prefix, kpos, _ = reference(model, head, inputs, decide=lambda A: kept)
        force(head, kept, 64)
        with apply_glimpse(model, head) as h:
            out = model(**inputs)
            assert [k[0].tolist() for k in h.last_kept] == kept
            gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 128 + sum(map(len, kept))
    assert_close(out.logits[0], want, **TOL)
    eos = model.generation_config.eos_token_id
    new = reference_generate(model, want, prefix, kpos, 6, eos)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(gen[0, :T], inputs["input_ids"][0])  # the caller's prompt, then the new tokens
    assert gen[0, T:T + len(new)].tolist() == new


def test_vip_decision_matches_the_hand_reference(llava):
    model, proc = llava
    counts = []
    for i in range(3):
        head = split_head(model, proc, seed=2, sample=i, image=0)
        inputs = one_sample(proc, i)
        with torch.no_grad():
            want, kept, prefix, kpos, _ = reference(model, head, inputs, thr=0.5, min_keep=1)
            with apply_glimpse(model, head) as h:
                out = model(**inputs)
                got_kept = [k[0].tolist() for k in h.last_kept]
                gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert got_kept == kept
        counts += [len(k) for k in kept]
        assert_close(out.logits[0], want, **TOL)
        new = reference_generate(model, want, prefix, kpos, 5, model.generation_config.eos_token_id)
        T = inputs["input_ids"].shape[1]
        assert gen[0, T:T + len(new)].tolist() == new
    assert all(0 < n < 64 for n in counts) and len(set(counts)) > 1  # real, different subsets


def test_options_override_the_head_config(llava):
    model, proc = llava
    head = split_head(model, proc, seed=2)
    inputs = one_sample(proc, 0)
    with torch.no_grad():
        _, default, *_ = reference(model, head, inputs)
        _, kept, *_ = reference(model, head, inputs, thr=0.7, min_keep=20, max_ratio=0.5)
        assert kept != default
        with apply_glimpse(model, head, threshold=0.7, min_keep=20, max_ratio=0.5) as h:
            model(**inputs)
            assert [k[0].tolist() for k in h.last_kept] == kept
        head.config.update(reduce_threshold=0.7, min_remain_num=20, max_remain_ratio=0.5)
        with apply_glimpse(model, head) as h:  # defaults from the head's config
            model(**inputs)
            assert [k[0].tolist() for k in h.last_kept] == kept


def test_batch_equals_each_sample_alone(llava):
    model, proc = llava
    head = split_head(model, proc, seed=2)
    texts, groups = ragged_batch()
    batch = encode(proc, texts, [im for g in groups for im in g])
    assert not batch["attention_mask"].all()  # left padding
    T = batch["input_ids"].shape[1]
    seen = []
    orig = head.predict
    head.predict = lambda A, c, g: seen.append(A) or orig(A, c, g)
    with torch.no_grad(), apply_glimpse(model, head) as h:
        out = model(**batch, use_cache=False)
        kept = [k[0].tolist() for k in h.last_kept]
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, output_scores=True)
        A_batch = seen[0]
        rows = []
        j = 0
        for i, (text, imgs) in enumerate(zip(texts, groups)):
            alone = encode(proc, [text], imgs)
            seen.clear()
            one = model(**alone)
            rows.append(one.logits[0])
            assert [k[0].tolist() for k in h.last_kept] == kept[j:j + len(imgs)]
            assert_close(seen[0], A_batch[j:j + len(imgs)], **TOL)  # padding never enters the glimpse row
            g1 = model.generate(**alone, max_new_tokens=5, do_sample=False)
            new = g1[0, alone["input_ids"].shape[1]:]
            assert torch.equal(gen.sequences[i, T:T + new.numel()], new)
            assert (gen.sequences[i, T + new.numel():] == proc.tokenizer.pad_token_id).all()
            j += len(imgs)
    assert len({len(k) for k in kept}) == 3 and 0 < len(kept[-1]) < 64  # different counts, a partial one
    M = out.logits.shape[1]
    for i, r in enumerate(rows):
        assert_close(out.logits[i, M - r.shape[0]:], r, **TOL)  # left-padded rows of the kept sequence
    assert torch.equal(gen.sequences[:, :T], batch["input_ids"])
    assert len(gen.logits) == 5 and len(gen.scores) == 5
    assert_close(gen.logits[0], out.logits[:, -1].float(), atol=1e-5, rtol=1e-5)


def test_generate_options_and_positional_input(llava):
    model, proc = llava
    head = split_head(model, proc, seed=2)
    inputs = one_sample(proc, 1)
    with torch.no_grad(), apply_glimpse(model, head):
        d = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                           output_scores=True)
        args = dict(inputs)
        pos = model.generate(args.pop("input_ids"), **args, max_new_tokens=3, do_sample=False)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
        with pytest.raises(ValueError, match="use_cache"):
            model.generate(**inputs, max_new_tokens=2, use_cache=False)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(pos, d.sequences) and len(d.scores) == 3
    assert torch.equal(beams[:, :T], inputs["input_ids"]) and beams.shape[1] <= T + 3


def test_forward_loss_and_manual_decoding(llava):
    # labels are gathered with the kept tokens; a cache returned by forward decodes like generate.
    model, proc = llava
    head = split_head(model, proc, seed=2)
    inputs = one_sample(proc, 2)
    labels = inputs["input_ids"].clone()
    with torch.no_grad(), apply_glimpse(model, head) as h:
        out = model(**inputs, labels=labels)
        kept = h.last_kept
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        cache_kw = "cache" if "cache" in out else "past_key_values"
        cache = out[cache_kw]
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = inputs["attention_mask"]
        seq = [tok]
        for _ in range(2):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            step = model(input_ids=tok, attention_mask=mask, **{cache_kw: cache})
            tok = step.logits[:, -1].argmax(-1, keepdim=True)
            seq.append(tok)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(torch.cat(seq, 1)[0], gen[0, T:])
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = sorted(set(range(T)) - set(img.tolist()) | {int(img[j]) for j in kept[0][0].tolist()})
    kl = labels[0, keep]
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1], kl[1:])
    assert_close(out.loss, want.float(), atol=1e-6, rtol=1e-6)  # HF computes the loss in float32


def test_remove_restores_the_model(llava):
    model, proc = llava
    head = make_head(model)
    inputs = one_sample(proc, 1)
    with torch.no_grad():
        want = model(**inputs).logits
        h = apply_glimpse(model, head)
        with pytest.raises(ValueError, match="already pruned"):
            apply_glimpse(model, head)
        assert model(**inputs).logits.shape[1] <= want.shape[1]
        # without images the wrapper passes straight through
        assert_close(model(input_ids=inputs["input_ids"][:, :3]).logits,
                     model.__class__.forward(model, input_ids=inputs["input_ids"][:, :3]).logits)
        h.remove()
        h.remove()
        assert "forward" not in model.__dict__ and "generate" not in model.__dict__
        assert torch.equal(model(**inputs).logits, want)


# ----------------------------------------------------------------------------- checkpoints

def test_save_and_load_round_trip(llava, tmp_path):
    model, proc = llava
    head = split_head(model, proc, seed=4)
    inputs = one_sample(proc, 0)
    head.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "new_modules_gp.pt"]
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["reduce_layer"] == K and cfg["selected_layers"] == [K] and cfg["le_layers"] == [0, 1, 2, 3]
    assert cfg["text_config"]["hidden_size"] == 64 and cfg["model_type"] == "llava"
    loaded = GlimpseHead.from_pretrained(tmp_path, model=model)
    assert loaded.learnable_embeddings.dtype == torch.float64
    for (n1, p1), (n2, p2) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        with apply_glimpse(model, head) as h:
            a, ka = model(**inputs).logits, h.last_kept
        with apply_glimpse(model, str(tmp_path)) as h:  # a directory works as the head
            b, kb = model(**inputs).logits, h.last_kept
    assert torch.equal(a, b) and all(torch.equal(x[0], y[0]) for x, y in zip(ka, kb))
    f32 = GlimpseHead.from_pretrained(tmp_path, dtype=torch.float32)
    assert f32.le_proj.weight.dtype == torch.float32


def published_state(model):
    """A new_modules_gp.pt dict in the published key layout (ALGORITHMS.md step 6), keys and shapes
    written out here."""
    g = torch.Generator().manual_seed(5)
    L, H, Hq, C = 4, 64, 4, 32
    fuser = {"attn_in_proj.weight": (256, Hq), "attn_in_proj.bias": (256,),
             "attn_out_projs.3.weight": (1, 256), "attn_out_projs.3.bias": (1,)}
    for i in range(4):
        fuser[f"cond_in_projs.{i}.weight"] = (512, C)
        fuser[f"cond_in_projs.{i}.bias"] = (512,)
        fuser[f"layers.{i}.norm1.weight"] = (256,)
        fuser[f"layers.{i}.norm2.weight"] = (256,)
        fuser[f"layers.{i}.attn.q_proj.weight"] = (768, 768)
        fuser[f"layers.{i}.attn.k_proj.weight"] = (768, 768)
        fuser[f"layers.{i}.attn.v_proj.weight"] = (256, 256)
        fuser[f"layers.{i}.attn.o_proj.weight"] = (256, 256)
        for m, shape in (("gate_proj", (512, 256)), ("up_proj", (512, 256)), ("down_proj", (256, 512))):
            fuser[f"layers.{i}.mlp.{m}.weight"] = shape
            fuser[f"layers.{i}.mlp.{m}.bias"] = (shape[0],)
    rnd = lambda s: torch.randn(*s, generator=g) * 0.05
    return {"attn_fuser": {k: rnd(s) for k, s in fuser.items()},
            "learnable_embeddings": rnd((L, 1, H)),
            "le_proj": {"weight": rnd((H, H)), "bias": rnd((H,))},
            "le_norm": {"weight": 1 + rnd((H,))}}


def write_published(model, path, state, **fields):
    cfg = model.config.to_dict()
    cfg.update(reduce_layer=K, selected_layers=[K], selected_visual_layers=[4, 3, 2, 1], attn_fuse_size=256,
               visual_cond_size=512, attn_fuse_num_heads=4, reduce_threshold=0.5, min_remain_num=1,
               max_remain_ratio=None, use_attention_logits=False, le_length=1, le_layers=list(range(4)))
    cfg.update(fields)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, default=str))
    torch.save(state, path / "new_modules_gp.pt")


def test_loads_the_published_key_layout(llava, tmp_path):
    model, proc = llava
    state = published_state(model)
    write_published(model, tmp_path, state)
    head = GlimpseHead.from_pretrained(tmp_path, model=model)
    assert head.reduce_layer == K and head.selected_visual_layers == [4, 3, 2, 1]
    sd = head.state_dict()
    for k, t in state["attn_fuser"].items():
        assert torch.equal(sd[f"attn_fuser.{k}"], t.double()), k
    assert torch.equal(head.learnable_embeddings, state["learnable_embeddings"].double())
    assert torch.equal(head.le_proj.bias, state["le_proj"]["bias"].double())
    assert torch.equal(head.le_norm.weight, state["le_norm"]["weight"].double())
    # saving writes the same layout back
    out = tmp_path / "again"
    head.save_pretrained(out)
    again = torch.load(out / "new_modules_gp.pt", weights_only=True)
    assert sorted(again) == sorted(state) and sorted(again["attn_fuser"]) == sorted(state["attn_fuser"])
    # deep supervision: an out layer after every block, the decision from the last
    ds = published_state(model)
    for i in range(3):
        ds["attn_fuser"][f"attn_out_projs.{i}.weight"] = torch.zeros(1, 256)
        ds["attn_fuser"][f"attn_out_projs.{i}.bias"] = torch.full((1,), 50.0)
    write_published(model, tmp_path / "ds", ds, deep_supervision=True)
    dsh = GlimpseHead.from_pretrained(tmp_path / "ds", model=model)
    g = torch.Generator().manual_seed(2)
    A = torch.randn(1, 64, 4, generator=g, dtype=torch.float64)
    conds = [torch.randn(1, 64, 32, generator=g, dtype=torch.float64) for _ in range(4)]
    assert torch.equal(dsh.predict(A, conds, (8, 8)), head.predict(A, conds, (8, 8)))


def test_bad_checkpoints(llava, tmp_path):
    model, _ = llava
    state = published_state(model)
    del state["attn_fuser"]["layers.2.attn.k_proj.weight"]
    write_published(model, tmp_path / "missing", state)
    with pytest.raises(ValueError, match=r"missing keys \['attn_fuser.layers.2.attn.k_proj.weight'\]"):
        GlimpseHead.from_pretrained(tmp_path / "missing")
    state = published_state(model)
    state["le_proj"]["weight"] = torch.zeros(64, 63)
    write_published(model, tmp_path / "shape", state)
    with pytest.raises(ValueError, match=r"le_proj.weight has shape \(64, 63\), expected \(64, 64\)"):
        GlimpseHead.from_pretrained(tmp_path / "shape")
    state = published_state(model)
    state["attn_fuser"]["attn_out_projs.0.weight"] = torch.zeros(1, 256)
    write_published(model, tmp_path / "extra", state)
    with pytest.raises(ValueError, match=r"unexpected keys \['attn_fuser.attn_out_projs.0.weight'\]"):
        GlimpseHead.from_pretrained(tmp_path / "extra")
    write_published(model, tmp_path / "k", published_state(model), reduce_layer=4)
    with pytest.raises(ValueError, match="reduce_layer"):
        GlimpseHead.from_pretrained(tmp_path / "k")
    with pytest.raises(ValueError, match="lacks config.json"):
        GlimpseHead.from_pretrained(tmp_path / "nowhere")


def test_head_for_another_model_is_an_error(llava):
    model, _ = llava
    for kw in (dict(text_hidden=96), dict(text_layers=3), dict(text_heads=8), dict(vision_hidden=48),
               dict(vision_layers=3)):
        args = dict(image_size=112, patch_size=14, vision_hidden=32, vision_layers=4, vision_heads=4,
                    text_hidden=64, text_layers=4, text_heads=4)
        args.update(kw)
        other, _ = tiny_llava("llava", **args)
        head = GlimpseHead.for_model(other, reduce_layer=1, selected_visual_layers=[2, 2, 1, 1])
        with pytest.raises(ValueError, match="another model"):
            apply_glimpse(model, head)
        with pytest.raises(ValueError, match="another model"):
            head.check_model(model)
    nxt, _ = tiny_llava("llava_next", image_size=56, patch_size=14, vision_hidden=32, vision_layers=3,
                        vision_heads=4, text_hidden=64, text_layers=2)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        apply_glimpse(nxt, GlimpseHead.for_model(nxt, reduce_layer=0))
    with pytest.raises(ValueError, match="head must be"):
        apply_glimpse(model, 3)


def test_placeholder_mismatch_is_an_error(llava):
    model, proc = llava
    head = make_head(model)
    inputs = dict(one_sample(proc, 1))
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    with torch.no_grad(), apply_glimpse(model, head):
        with pytest.raises(ValueError, match="image tokens"):
            model(**inputs)


def test_published_defaults():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2_5_VLConfig
    from vtkernels.flops import llava_1_5_7b_config
    h7 = GlimpseHead.for_model(llava_1_5_7b_config())
    assert h7.reduce_layer == 21 and h7.selected_visual_layers == [23, 17, 11, 5]
    assert h7.learnable_embeddings.shape == (32, 1, 4096)
    assert h7.attn_fuser.attn_in_proj.weight.shape == (256, 32)
    assert h7.attn_fuser.cond_in_projs[0].weight.shape == (512, 1024)
    assert not h7.use_attention_logits and h7.config["le_layers"] == list(range(32))
    c13 = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, image_size=336,
                                                     patch_size=14, num_attention_heads=16),
                      text_config=LlamaConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40))
    assert GlimpseHead.for_model(c13).reduce_layer == 26
    q7 = Qwen2_5_VLConfig(text_config=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28),
                          vision_config=dict(depth=32, hidden_size=1280))
    hq = GlimpseHead.for_model(q7)
    assert hq.reduce_layer == 18 and hq.selected_visual_layers == [31, 23, 15, 7] and hq.use_attention_logits
    q3 = Qwen2_5_VLConfig(text_config=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16),
                          vision_config=dict(depth=32, hidden_size=1280))
    assert GlimpseHead.for_model(q3).reduce_layer == 23
    # other sizes: round(2/3 depth); other towers at the published fractions
    c = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=64, num_hidden_layers=12, image_size=224,
                                                   patch_size=14, num_attention_heads=4),
                    text_config=LlamaConfig(hidden_size=256, num_hidden_layers=16, num_attention_heads=4))
    h = GlimpseHead.for_model(c)
    assert h.reduce_layer == 11 and h.selected_visual_layers == [12, 9, 6, 3]
    assert GlimpseHead.for_model(c, reduce_layer=3).reduce_layer == 3
    with pytest.raises(ValueError, match="reduce_layer"):
        GlimpseHead.for_model(c, reduce_layer=16)
    with pytest.raises(ValueError, match="unknown glimpse fields"):
        GlimpseHead.for_model(c, threshold=0.3)
    assert ghead.default_condition_layers("qwen2_5_vl", 16) == [15, 11, 7, 3]


# ----------------------------------------------------------------------------- FLOPs

def test_prefill_flops():
    from vtkernels import flops
    cfg = flops.llava_1_5_7b_config()
    n_text, N = 60, 576
    base = flops.prefill_flops(cfg, N, n_text)
    f = prefill_flops(cfg, n_text, N, kept=N)
    # nothing pruned: the language work is the unpruned one plus the glimpse token in layers 0..K
    plus_one = flops.prefill_flops(cfg, N + 1, n_text, logits_tokens=0).language
    per_layer_full = plus_one / 32
    assert math.isclose(f.language_full, 22 * per_layer_full, rel_tol=1e-12)
    lm_head = 2 * 4096 * 32064
    assert math.isclose(f.language_pruned, 10 / 32 * (base.language - lm_head) + lm_head, rel_tol=1e-12)
    # the tower stops at hidden_states[23] (feature layer -2 and the deepest condition)
    assert math.isclose(f.vision, flops.prefill_flops(cfg, N, n_text, vision_layers=23).vision)
    assert f.projector == base.projector
    # pruning everything saves at most (L - K - 1) / L of the language work
    f0 = prefill_flops(cfg, n_text, N, kept=0)
    saving = 1 - f0.language / base.language
    assert 0 < saving <= (32 - 21 - 1) / 32
    assert 0 < f.vip < 1e-2 * f.total and 0 < f.glimpse < 1e-3 * f.total
    with pytest.raises(ValueError, match="kept"):
        prefill_flops(cfg, n_text, N, kept=N + 1)


def test_apply_pruning_method_glimpse_is_apply_glimpse(llava):
    import vtkernels.hf as vhf
    model, proc = llava
    head = make_head(model, seed=1)
    inputs = one_sample(proc, 0)
    with torch.no_grad():
        with apply_glimpse(model, head, threshold=0.5) as h:
            want = model(**inputs).logits
            want_kept = [[c.clone() for c in img] for img in h.last_kept]
        with vhf.pruning(model, method="glimpse", head=head, threshold=0.5) as h:
            got = model(**inputs).logits
            got_kept = h.last_kept
    assert torch.equal(got, want)
    assert [[c.tolist() for c in img] for img in got_kept] == [[c.tolist() for c in img] for img in want_kept]
    with pytest.raises(ValueError, match="needs head="):
        vhf.apply_pruning(model, "glimpse")
    with pytest.raises(ValueError, match="unknown"):
        vhf.apply_pruning(model, "glimpse", head=head, keep=3)
    assert not hasattr(model, "forward") or "forward" not in vars(model)
