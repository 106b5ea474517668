"""vtkernels.hf on small LLaVA / LLaVA-NeXT models with random weights, built offline from configs.

The models run in float64, where pruning is exact: every comparison below is against a model
pruned by hand from the named layers with vtkernels.reference (hidden states of the tower, q and k
recomputed from the layer's input), or against the unpruned model, or against the same sample
run alone. Runs on the latest transformers and on 5.17 (`make test-hf-old`).
"""
import copy

import pytest
import torch
from torch.testing import assert_close

import vtkernels.hf as vhf
from vtkernels import ops
from vtkernels import reference as ref
from vtkernels.cli import tiny_llava
from pictures import picture

METHODS = ["fopru_rank", "fopru_row", "vispruner", "prumerge", "prumerge_plus"]
FIXED = ["fopru_rank", "fopru_row", "vispruner"]
OPTS = {"fopru_rank": {"keep": 12}, "fopru_row": {"keep": 12}, "vispruner": {"keep": 12},
        "prumerge": {"knn": 6}, "prumerge_plus": {"knn": 6}}
TOL = dict(atol=1e-10, rtol=1e-9)  # float64 end to end


@pytest.fixture(scope="module")
def llava():
    # 112 px / 14 = 8 x 8 patches; three encoder layers, so the feature layer (-2) is layer 1.
    model, proc = tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=3,
                             vision_heads=4, text_hidden=64, text_layers=2, seed=1)
    return model.double(), proc


@pytest.fixture(scope="module")
def llava_next():
    model, proc = tiny_llava("llava_next", image_size=56, patch_size=14, vision_hidden=32, vision_layers=3,
                             vision_heads=4, text_hidden=64, text_layers=2, seed=2)
    return model.double(), proc


def encode(proc, texts, images):
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


def same_length_batch(proc):
    # Equal lengths: no padding in this batch.
    texts = ["user : <image> what is this one ? assistant :", "user : <image> where is the sun ? assistant :"]
    return encode(proc, texts, [picture(1, 90, 120), picture(2, 130, 100)])


def ragged_batch(proc):
    """Three prompts of different lengths; the first has two images, so rows compact unequally."""
    texts = ["user : <image> <image> which one shows a tree ? assistant :",
             "user : <image> what ? assistant :",
             "user : <image> how many windows are there in the house ? assistant :"]
    images = [picture(3, 80, 80), picture(4, 100, 60), picture(5, 70, 140), picture(6, 120, 90)]
    groups = [images[:2], images[2:3], images[3:]]
    return texts, groups


def same_new_tokens(alone_out, prompt_len, batch_row, pad_id):
    """A sample generated alone stops at EOS; in a batch its row is then padded."""
    new = alone_out[0, prompt_len:]
    assert torch.equal(batch_row[:new.numel()], new)
    assert (batch_row[new.numel():] == pad_id).all()


def layers_of(model):
    t = model.model.vision_tower
    return (t.vision_model.encoder.layers if hasattr(t, "vision_model") else t.encoder.layers)


# ----------------------------------------------------------------------------- hand reference

def reference_tokens(model, pixel_values, method, opts):
    """Projected tokens per crop, pruned by hand with vtkernels.reference (ALGORITHMS.md layers),
    plus the kept positions (None for PruMerge)."""
    tower = model.model.vision_tower
    layers = layers_of(model)
    L = len(layers)
    H = model.config.vision_config.num_attention_heads
    with torch.no_grad():
        hs = tower(pixel_values, output_hidden_states=True).hidden_states
        f = model.config.vision_feature_layer % (L + 1)
        x = hs[f][:, 1:]

        def qk(j):  # q, k of layer j, recomputed from that layer's input
            lay = layers[j]
            h = lay.layer_norm1(hs[j])
            return lay.self_attn.q_proj(h), lay.self_attn.k_proj(h)

        out = []
        if method.startswith("prumerge"):
            q, k = qk(L - 1)
            s = ref.cls_attention(q, k, 1)
            toks, lens = ref.prumerge(x, k[:, 1:], s, opts.get("knn", 32), method == "prumerge_plus",
                                      opts.get("per_sample", True))
            out = [(toks[i, :lens[i]], None) for i in range(x.shape[0])]
        else:
            q, k = qk(f - 1)
            if method == "vispruner":
                s = ref.cls_attention(q, k, H)
                idx = ref.vispruner_select(x, s, opts["keep"])
                toks = ref.gather_tokens(x, idx)
            else:
                s = ref.fopru_significance(q, k, H)
                toks, idx = ref.fopru_select(x, s, opts["keep"], method.split("_")[1])
            out = [(toks[i], idx[i]) for i in range(x.shape[0])]
        return [(model.model.multi_modal_projector(t), i) for t, i in out]


def hand_pruned_logits(model, inputs, images_tokens):
    """Unpruned model fed the compacted sequence by hand: each image keeps its first m placeholders."""
    img_id = model.config.image_token_id
    rows = []
    it = iter(images_tokens)
    for row in inputs["input_ids"]:
        new, i = [], 0
        ids = row.tolist()
        while i < len(ids):
            if ids[i] == img_id:
                j = i
                while j < len(ids) and ids[j] == img_id:
                    j += 1
                n = next(it).shape[0]
                new += [img_id] * n
                i = j
            else:
                new.append(ids[i])
                i += 1
        rows.append(new)
    assert len({len(r) for r in rows}) == 1, "hand reference expects equal-length rows"
    ids = torch.tensor(rows)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == img_id)[..., None], torch.cat(list(images_tokens)).to(emb.dtype))
        return model(inputs_embeds=emb).logits


# ----------------------------------------------------------------------------- LLaVA-1.5

@pytest.mark.parametrize("method", METHODS)
def test_matches_model_pruned_by_hand(llava, method):
    model, proc = llava
    inputs = same_length_batch(proc)
    per_image = reference_tokens(model, inputs["pixel_values"], method, OPTS[method])
    want = hand_pruned_logits(model, inputs, [t for t, _ in per_image])
    with vhf.pruning(model, method, **OPTS[method]) as h, torch.no_grad():
        got = model(**inputs).logits
    assert got.dtype == torch.float64
    assert got.shape == want.shape
    assert_close(got, want, **TOL)
    assert h.last_lengths == [t.shape[0] for t, _ in per_image]
    for kept, (_, idx) in zip(h.last_kept, per_image):
        if idx is not None:
            assert kept[0].tolist() == idx.tolist()


def test_hooked_scores_are_the_attention_maps(llava):
    """The hand reference's q/k (layer input -> layer_norm1 -> q_proj/k_proj) reproduce the
    attention Hugging Face computes (eager, output_attentions), so the reference is the real one."""
    model, proc = llava
    inputs = same_length_batch(proc)
    eager = copy.deepcopy(model)
    eager.model.vision_tower.set_attn_implementation("eager")
    layers = layers_of(eager)
    H = model.config.vision_config.num_attention_heads
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        F = model.config.vision_feature_layer % (len(layers) + 1) - 1
        lay = layers[F]
        h = lay.layer_norm1(out.hidden_states[F])
        q, k = lay.self_attn.q_proj(h), lay.self_attn.k_proj(h)
    a = out.attentions[F].mean(1)  # [B, T, T]
    assert_close(ops.cls_attention(q, k, H).double(), a[:, 0, 1:], atol=1e-7, rtol=1e-6)
    p = a[:, 1:, 1:]
    col, row = p.mean(1), p.mean(2)
    sig = torch.where((col.var(1, unbiased=False) >= row.var(1, unbiased=False))[:, None], col, row)
    assert_close(ops.fopru_significance(q, k, H).double(), sig, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("method", FIXED)
def test_keep_all_reproduces_unpruned(llava, method):
    model, proc = llava
    inputs = same_length_batch(proc)
    N = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    with torch.no_grad():
        want = model(**inputs).logits
        with vhf.pruning(model, method, keep=N):
            got = model(**inputs).logits
    assert_close(got, want, atol=1e-12, rtol=1e-12)
    texts, groups = ragged_batch(proc)
    batch = encode(proc, texts, [im for g in groups for im in g])
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=5, do_sample=False)
        with vhf.pruning(model, method, keep=N):
            got = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample_alone(llava, method):
    model, proc = llava
    texts, groups = ragged_batch(proc)
    batch = encode(proc, texts, [im for g in groups for im in g])
    L = batch["input_ids"].shape[1]
    with vhf.pruning(model, method, **OPTS[method]) as h, torch.no_grad():
        logits = model(**batch).logits[:, -1]
        lengths = list(h.last_lengths)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert torch.equal(out[:, :L], batch["input_ids"])  # the caller's prompt, then new tokens
        assert out.shape[0] == len(texts) and L < out.shape[1] <= L + 4
        for i, (text, imgs) in enumerate(zip(texts, groups)):
            alone = encode(proc, [text], imgs)
            assert_close(model(**alone).logits[0, -1], logits[i], **TOL)
            one = model.generate(**alone, max_new_tokens=4, do_sample=False)
            same_new_tokens(one, alone["input_ids"].shape[1], out[i, L:], proc.tokenizer.pad_token_id)
    if method in FIXED:
        assert lengths == [OPTS[method]["keep"]] * 4


def test_generate_return_dict_and_positional_input(llava):
    model, proc = llava
    inputs = same_length_batch(proc)
    with vhf.pruning(model, "fopru_rank", keep=8), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_scores=True)
        args = dict(inputs)
        ids = args.pop("input_ids")
        pos = model.generate(ids, **args, max_new_tokens=3, do_sample=False)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :L], inputs["input_ids"]) and len(out.scores) == 3
    assert torch.equal(pos, out.sequences)


LENGTH_SOURCES = ["keyword", "generation_config", "model.generation_config"]


@pytest.fixture
def restore_generation_config(llava):
    """These tests set model.generation_config on the shared model: put it back afterwards."""
    model, _ = llava
    saved = copy.deepcopy(model.generation_config)
    yield
    model.generation_config = saved


def length_call(model, source, **lengths):
    """generate() arguments that set `lengths` from `source` (model.generation_config: edited here)."""
    from transformers import GenerationConfig
    if source == "keyword":
        return dict(do_sample=False, **lengths)
    if source == "generation_config":
        return dict(generation_config=GenerationConfig(do_sample=False, **lengths))
    for name, value in lengths.items():
        setattr(model.generation_config, name, value)
    return dict(do_sample=False)


def config_snapshot(model, call):
    return (model.generation_config.to_dict(),
            call["generation_config"].to_dict() if "generation_config" in call else None)


@pytest.mark.parametrize("source", LENGTH_SOURCES)
def test_generate_max_length_counts_the_original_prompt(llava, restore_generation_config, source):
    # max_length counts the prompt; pruning shortens the prompt the model sees, not the number of
    # new tokens: wherever max_length comes from, as many new tokens as without pruning.
    model, proc = llava
    inputs = same_length_batch(proc)
    L = inputs["input_ids"].shape[1]
    call = length_call(model, source, max_length=L + 4)
    before = config_snapshot(model, call)
    with torch.no_grad():
        want = model.generate(**inputs, **call)
        with vhf.pruning(model, "fopru_rank", keep=4):
            got = model.generate(**inputs, **call)
    assert want.shape[1] - L == 4 and got.shape[1] - L == 4
    assert torch.equal(got[:, :L], inputs["input_ids"])
    assert config_snapshot(model, call) == before  # neither the model's nor the caller's config edited


@pytest.mark.parametrize("source", LENGTH_SOURCES)
def test_generate_min_length_counts_the_original_prompt(llava, restore_generation_config, source):
    # Every token but 5 is an EOS: min_length forces 5 until it is reached, then the next token ends
    # the sequence, so min_length - L + 1 new tokens, pruned or not.
    model, proc = llava
    inputs = same_length_batch(proc)
    L = inputs["input_ids"].shape[1]
    eos = [t for t in range(model.config.text_config.vocab_size) if t != 5]
    call = length_call(model, source, min_length=L + 3, max_length=L + 10, eos_token_id=eos)
    before = config_snapshot(model, call)
    with torch.no_grad():
        want = model.generate(**inputs, **call)
        with vhf.pruning(model, "fopru_rank", keep=4):
            got = model.generate(**inputs, **call)
    assert want.shape[1] - L == 4 and got.shape[1] - L == 4
    assert (want[:, L:L + 3] == 5).all() and (got[:, L:L + 3] == 5).all()
    assert config_snapshot(model, call) == before


def test_generate_default_max_length_as_unpruned(llava, restore_generation_config):
    # Nothing sets a length: transformers' default (20 new tokens, capped by
    # config.max_position_embeddings where the config has it) applies as without pruning.
    model, proc = llava
    inputs = same_length_batch(proc)
    L = inputs["input_ids"].shape[1]
    had = "max_position_embeddings" in model.config.__dict__
    saved = getattr(model.config, "max_position_embeddings", None)
    try:
        for cap, new in ((None, 20), (L + 6, 6)):
            model.config.max_position_embeddings = cap
            with torch.no_grad():
                want = model.generate(**inputs, do_sample=False)
                with vhf.pruning(model, "fopru_rank", keep=4):
                    got = model.generate(**inputs, do_sample=False)
            assert want.shape[1] - L == new and got.shape[1] - L == new
    finally:
        if had:
            model.config.max_position_embeddings = saved
        else:
            model.config.__dict__.pop("max_position_embeddings", None)
    assert model.generation_config.max_length is None


def test_generate_max_new_tokens_wins_over_max_length(llava, restore_generation_config):
    # model.generation_config's max_new_tokens beats a max_length keyword, as in transformers.
    model, proc = llava
    inputs = same_length_batch(proc)
    L = inputs["input_ids"].shape[1]
    model.generation_config.max_new_tokens = 3
    with torch.no_grad():
        want = model.generate(**inputs, do_sample=False, max_length=L + 6)
        with vhf.pruning(model, "fopru_rank", keep=4):
            got = model.generate(**inputs, do_sample=False, max_length=L + 6)
    assert want.shape[1] - L == 3 and got.shape[1] - L == 3


def test_labels_are_compacted(llava):
    model, proc = llava
    inputs = same_length_batch(proc)
    img = model.config.image_token_id
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == img, -100)
    keep = 10
    with torch.no_grad():
        full = model(**inputs, labels=labels)
        N = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        with vhf.pruning(model, "vispruner", keep=N):
            assert_close(model(**inputs, labels=labels).loss, full.loss, atol=1e-12, rtol=1e-12)
        with vhf.pruning(model, "vispruner", keep=keep):
            out = model(**inputs, labels=labels)
    # Compacted labels: the text labels in order, -100 on the kept image slots.
    lab = torch.tensor([row[:row.index(-100)] + [-100] * keep + row[row.index(-100) + N:]
                        for row in labels.tolist()])
    assert out.logits.shape[1] == lab.shape[1]
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                                             lab[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, want)  # Hugging Face computes the loss in float32


def test_runs_only_the_layers_it_reads_and_never_attention_maps(llava, monkeypatch):
    model, proc = llava
    inputs = same_length_batch(proc)
    layers = layers_of(model)
    calls = {}

    def count(name):
        def hook(_m, _a, out):
            calls[name] = calls.get(name, 0) + 1
        return hook

    def no_weights(_m, _a, out):
        assert out[1] is None, "an attention map was formed"

    hooks = [l.register_forward_hook(count(f"layer{i}")) for i, l in enumerate(layers)]
    hooks += [l.mlp.register_forward_hook(count(f"mlp{i}")) for i, l in enumerate(layers)]
    hooks += [l.self_attn.q_proj.register_forward_hook(count(f"q{i}")) for i, l in enumerate(layers)]
    hooks += [l.self_attn.register_forward_hook(no_weights) for l in layers]
    dtypes = []
    for name in ("fopru_significance", "cls_attention"):
        real = getattr(ops, name)

        def spy(q, k, *a, _real=real, **kw):
            dtypes.append(q.dtype)
            return _real(q, k, *a, **kw)
        monkeypatch.setattr(ops, name, spy)
    try:
        assert model.model.vision_tower.config._attn_implementation == "sdpa"
        with torch.no_grad():
            for method in ("fopru_rank", "vispruner"):
                calls.clear()
                with vhf.pruning(model, method, keep=8):
                    model(**inputs)
                assert calls.get("layer1") == 1 and "layer2" not in calls and "q2" not in calls
            calls.clear()
            with vhf.pruning(model, "prumerge"):
                model(**inputs)
            # PruMerge reads the last layer's q and k, nothing else of it.
            assert calls.get("q2") == 1 and "layer2" not in calls and "mlp2" not in calls
    finally:
        for h in hooks:
            h.remove()
    assert dtypes and all(d == torch.float64 for d in dtypes)


def test_remove_and_context_manager(llava):
    model, proc = llava
    inputs = same_length_batch(proc)
    before = dict(model.__dict__)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(**inputs).logits
        handle = vhf.apply_pruning(model, "fopru_row", keep=16)
        assert model(**inputs).logits.shape[1] < want.shape[1]
        with pytest.raises(ValueError, match="already pruned"):
            vhf.apply_pruning(model, "vispruner", keep=8)
        handle.remove()
        handle.remove()  # idempotent
        assert model.__dict__.keys() == before.keys()
        assert all(model.__dict__[k] is before[k] for k in before)
        assert torch.equal(model(**inputs).logits, want)
        with pytest.raises(RuntimeError, match="inside"):
            with vhf.pruning(model, "prumerge") as h:
                assert "forward" in model.__dict__
                raise RuntimeError("inside")
        assert "forward" not in model.__dict__ and "generate" not in model.__dict__
        assert torch.equal(model(**inputs).logits, want)
        # Calls without images are the model's own, untouched.
        with vhf.pruning(model, "vispruner", keep=4):
            text_only = proc.tokenizer(["what is this ?"], return_tensors="pt")
            assert torch.equal(model(**text_only).logits, model.__class__.forward(model, **text_only).logits)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_errors(llava):
    model, _ = llava
    N = 64
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        vhf.apply_pruning(llama, "fopru_rank", keep=4)
    with pytest.raises(ValueError, match="unknown method"):
        vhf.apply_pruning(model, "random", keep=4)
    with pytest.raises(ValueError, match="keep"):
        vhf.apply_pruning(model, "fopru_rank")
    with pytest.raises(ValueError, match=rf"keep={N + 1} must be in \[1, {N}\]"):
        vhf.apply_pruning(model, "vispruner", keep=N + 1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="keep"):
            vhf.apply_pruning(model, "fopru_row", keep=bad)
    with pytest.raises(ValueError, match="unknown"):
        vhf.apply_pruning(model, "fopru_rank", keep=4, important_ratio=0.5)
    with pytest.raises(ValueError, match="unknown"):
        vhf.apply_pruning(model, "prumerge", keep=4)
    with pytest.raises(ValueError, match="important_ratio"):
        vhf.apply_pruning(model, "vispruner", keep=4, important_ratio=1.5)
    with pytest.raises(ValueError, match="knn"):
        vhf.apply_pruning(model, "prumerge_plus", knn=0)
    with pytest.raises(ValueError, match="dedup_step"):
        vhf.apply_pruning(model, "vispruner", keep=4, dedup_step=0)
    assert "forward" not in model.__dict__  # failed calls leave nothing behind


def test_lower_precision_runs(llava):
    model, proc = llava
    m = copy.deepcopy(model).to(torch.bfloat16)
    inputs = same_length_batch(proc)
    for method in METHODS:
        with vhf.pruning(m, method, **OPTS[method]), torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


# ----------------------------------------------------------------------------- LLaVA-NeXT

def next_inputs(proc, sizes=((50, 90), (80, 60)), texts=None):
    texts = texts or ["user : <image> what is this ? assistant :", "user : <image> what is the sky ? assistant :"]
    return encode(proc, texts, [picture(10 + i, h, w) for i, (h, w) in enumerate(sizes)])


def next_reference(model, inputs, method, keep):
    """Expected image tokens per image, laid out by Hugging Face's own pack_image_features: a
    flag channel marks kept tokens (and newlines), then the unflagged rows are dropped."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    cfg = model.config
    G = cfg.vision_config.image_size // cfg.vision_config.patch_size
    N = G * G
    sizes = inputs["image_sizes"].tolist()
    counts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
    crops = torch.cat([pv[:c] for pv, c in zip(inputs["pixel_values"], counts)])
    layers = layers_of(model)
    H = cfg.vision_config.num_attention_heads
    with torch.no_grad():
        hs = model.model.vision_tower(crops, output_hidden_states=True).hidden_states
        f = cfg.vision_feature_layer % (len(layers) + 1)
        x = hs[f][:, 1:]
        lay = layers[f - 1]
        h = lay.layer_norm1(hs[f - 1])
        q, k = lay.self_attn.q_proj(h), lay.self_attn.k_proj(h)
        s = ref.cls_attention(q, k, H) if method == "vispruner" else ref.fopru_significance(q, k, H)
        # Which positions of each crop survive the unpad: pack crop-major ids, read them back.
        out, start = [], 0
        for img, c in enumerate(counts):
            ids = [torch.arange(c * N, dtype=torch.float64).view(c, N, 1)]
            packed, _ = model.model.pack_image_features(ids, inputs["image_sizes"][img:img + 1], "default",
                                                        image_newline=None)
            alive = set(int(v) for v in packed[0][:, 0].tolist())
            flags = torch.zeros(c, N, 1, dtype=torch.float64)
            for j in range(c):
                pos = [p for p in range(N) if j * N + p in alive]
                if not pos:
                    continue
                pos_t = torch.tensor(pos)
                xs, ss = x[start + j][pos_t][None], s[start + j][pos_t][None]
                kk = min(keep, len(pos))
                if method == "vispruner":
                    idx = ref.vispruner_select(xs, ss, kk)[0]
                elif method == "fopru_rank":
                    idx = ref.topk_indices(ss, kk)[0]
                else:  # the valid part of a crop is a rectangle: rows of its width
                    idx = ref.fopru_row_indices(ss, kk, len({p % G for p in pos}))[0]
                flags[j, pos_t[idx], 0] = 1.0
            feats = model.model.multi_modal_projector(x[start:start + c])
            both = [torch.cat([feats, flags], dim=-1)]
            nl = torch.cat([model.model.image_newline, torch.ones(1, dtype=torch.float64)])
            packed, _ = model.model.pack_image_features(both, inputs["image_sizes"][img:img + 1], "default",
                                                        image_newline=nl)
            packed = packed[0]
            out.append(packed[packed[:, -1] == 1][:, :-1])
            start += c
    return out


@pytest.mark.parametrize("method", FIXED)
def test_next_matches_hf_layout_pruned_by_hand(llava_next, method):
    model, proc = llava_next
    texts = ["user : <image> what is this ? assistant :", "user : <image> what is the sky ? assistant :"]
    inputs = next_inputs(proc, texts=texts)
    keep = 5
    per_image = next_reference(model, inputs, method, keep)
    with vhf.pruning(model, method, keep=keep) as h, torch.no_grad():
        got = model(**inputs).logits
    assert h.last_lengths == [t.shape[0] for t in per_image]
    # Rows differ in length after pruning (different crops and unpadding): compare each alone.
    for i, text in enumerate(texts):
        one = encode(proc, [text], [picture(10 + i, *((50, 90), (80, 60))[i])])
        want = hand_pruned_logits(model, one, [per_image[i]])
        assert_close(got[i, -1], want[0, -1], **TOL)


@pytest.mark.parametrize("method", FIXED)
def test_next_keep_all_reproduces_unpruned(llava_next, method):
    model, proc = llava_next
    inputs = next_inputs(proc, sizes=((80, 60), (60, 100)), texts=[
        "user : <image> what ? assistant :", "user : <image> what is this ? assistant :"])
    N = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        base = model(**inputs).logits
        with vhf.pruning(model, method, keep=N) as h:
            got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            logits = model(**inputs).logits
    assert torch.equal(got, want)
    assert h.last_lengths == (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    mask = inputs["attention_mask"].bool()
    # Unpadded rows are bit-for-bit the same computation.
    for i in range(2):
        if mask[i].all():
            assert_close(logits[i], base[i], atol=1e-12, rtol=1e-12)


def test_next_crops_pruned_independently(llava_next):
    model, proc = llava_next
    inputs = next_inputs(proc, sizes=((80, 60), (56, 56)))
    keep = 3
    with vhf.pruning(model, "fopru_rank", keep=keep) as h, torch.no_grad():
        model(**inputs)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    G = 4
    for img, kept in enumerate(h.last_kept):
        size = inputs["image_sizes"][img].tolist()
        assert len(kept) >= 2 and all(len(k) == keep for k in kept)  # every crop: the same budget
        nph, npw = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 56)
        ids = torch.arange((len(kept) - 1) * G * G).view(nph, npw, G, G, 1).permute(4, 0, 2, 1, 3)
        alive = set(unpad_image(ids.flatten(1, 2).flatten(2, 3), size)[0].reshape(-1).tolist())
        for j, k in enumerate(kept[1:]):
            assert all(j * G * G + int(p) in alive for p in k)  # never a padding token
        rows = unpad_image(ids.flatten(1, 2).flatten(2, 3), size)[0].shape[0]
        assert h.last_lengths[img] == keep * len(kept) + rows  # every newline kept


@pytest.mark.parametrize("method", METHODS)
def test_next_batch_equals_each_sample_alone(llava_next, method):
    model, proc = llava_next
    texts = ["user : <image> what is this ? assistant :", "user : <image> where ? assistant :",
             "user : <image> how many trees are there ? assistant :"]
    sizes = [(50, 90), (80, 60), (60, 60)]
    images = [picture(20 + i, h, w) for i, (h, w) in enumerate(sizes)]
    batch = encode(proc, texts, images)
    opts = {"keep": 4} if method in FIXED else OPTS[method]
    with vhf.pruning(model, method, **opts), torch.no_grad():
        logits = model(**batch).logits[:, -1]
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        L = batch["input_ids"].shape[1]
        assert torch.equal(out[:, :L], batch["input_ids"])
        for i in range(3):
            alone = encode(proc, [texts[i]], [images[i]])
            assert_close(model(**alone).logits[0, -1], logits[i], **TOL)
            one = model.generate(**alone, max_new_tokens=3, do_sample=False)
            same_new_tokens(one, alone["input_ids"].shape[1], out[i, L:], proc.tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- CUDA (GPU lane)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_cuda_end_to_end(kind):
    """On the GPU (vtk CUDA/Triton kernels): every method through generate, keep = all equals the
    unpruned model, a batch equals its samples alone (FoPru rank); float32 and bf16."""
    if kind == "llava":
        model, proc = tiny_llava("llava", image_size=112, patch_size=14, vision_hidden=32, vision_layers=3,
                                 text_hidden=64, text_layers=2, seed=1)
        texts, groups = ragged_batch(proc)
        images = [im for g in groups for im in g]
    else:
        model, proc = tiny_llava("llava_next", image_size=56, patch_size=14, vision_hidden=32,
                                 vision_layers=3, text_hidden=64, text_layers=2, seed=2)
        texts = ["user : <image> what is this ? assistant :", "user : <image> where ? assistant :"]
        images = [picture(30, 50, 90), picture(31, 80, 60)]
        groups = [[images[0]], [images[1]]]
    model = model.cuda()
    batch = encode(proc, texts, images).to("cuda")
    G = model.config.vision_config.image_size // model.config.vision_config.patch_size
    with torch.no_grad():
        want = model(**batch).logits
        with vhf.pruning(model, "fopru_rank", keep=G * G):
            got = model(**batch).logits
        mask = batch["attention_mask"].bool()
        assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
        for method in METHODS:
            opts = OPTS[method] if kind == "llava" or method not in FIXED else {"keep": 4}
            with vhf.pruning(model, method, **opts):
                out = model.generate(**batch, max_new_tokens=3, do_sample=False)
                last = model(**batch).logits[:, -1]
                assert torch.equal(out[:, :batch["input_ids"].shape[1]], batch["input_ids"])
                if method != "fopru_rank":
                    # float32 on the GPU: batch shapes change the rounding, and a near-tie may
                    # then select differently (exactness is the float64 tests' job above).
                    continue
                for i, (text, imgs) in enumerate(zip(texts, groups)):
                    alone = encode(proc, [text], imgs).to("cuda")
                    assert_close(model(**alone).logits[0, -1], last[i], atol=1e-4, rtol=1e-4)
        bf16 = model.to(torch.bfloat16)
        for method in METHODS:
            opts = OPTS[method] if kind == "llava" or method not in FIXED else {"keep": 4}
            with vhf.pruning(bf16, method, **opts):
                out = bf16.generate(**batch, max_new_tokens=2, do_sample=False)
            assert out.shape[0] == len(texts)
