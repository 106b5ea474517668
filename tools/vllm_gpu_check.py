"""GPU check of the vLLM plugin: tiny random models served pruned through ``vllm.LLM``, compared
with transformers on the same weights. Run by tools/vllm_gpu.sh (see there for what it needs).

Per model family and method: vLLM's prompt (text + ``keep`` placeholders per image), the log
probability vLLM gives every prompt token (``prompt_logprobs``) and its greedy tokens are compared
with transformers pruned the same way: LLaVA-1.5 through ``vtkernels.hf.apply_pruning``,
Qwen2.5-VL by hand (``vtkernels.vllm.testing``: the kept units' features and their own M-RoPE
ids, text at its unpruned ids). Unpruned vLLM against unpruned transformers runs first: if that
disagrees, the harness (or vLLM) is off, not the plugin.

``--hf-only`` runs the transformers side alone (on the CPU when there is no GPU): a smoke test of
this script where vLLM cannot serve.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile

import torch

METHODS = ("fopru_rank", "fopru_row", "vispruner")
LLAVA_PROMPTS = ["user : <image> what is in this picture ? assistant :",
                 "user : <image> and <image> which one shows a tree ? assistant :"]
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_PROMPTS = [f"user : {IMG} what is this picture ? assistant :",
                f"user : {IMG} and {IMG} what is this ? assistant :"]


class Failed(Exception):
    pass


def log(msg):
    print(msg, flush=True)


def images(n_prompts):
    from vtkernels.cli import ASSET_IMAGE
    from PIL import Image
    base = Image.open(ASSET_IMAGE).convert("RGB")
    # Qwen sees them at their own size (up to 96 merge units): one taller than wide, so the text
    # after it resumes past its rows, not its columns.
    return [[base.resize((200, 150))],
            [base.resize((210, 280)), base.rotate(90, expand=True).resize((300, 200))]][:n_prompts]


def sharpen(model):
    # Random weights give near-uniform next-token distributions, where greedy decoding hinges on
    # rounding. A larger output scale gives every step a clear winner, so the comparison of
    # greedy tokens tests the model, not the last bit of a tie.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)


def compare(name, want_ids, want_lp, want_new, out, atol):
    """want_*: the transformers side; out: vLLM's RequestOutput."""
    got_ids = list(out.prompt_token_ids)
    if got_ids != want_ids:
        raise Failed(f"{name}: vLLM prompt has {len(got_ids)} tokens, transformers {len(want_ids)}:\n"
                     f"  vllm {got_ids}\n  hf   {want_ids}")
    worst = 0.0
    for p in range(1, len(got_ids)):
        lp = out.prompt_logprobs[p][got_ids[p]].logprob
        worst = max(worst, abs(lp - float(want_lp[p - 1, got_ids[p]])))
    if worst > atol:
        raise Failed(f"{name}: prompt log-probabilities differ by up to {worst:.3g} (atol {atol})")
    got_new = list(out.outputs[0].token_ids)
    if got_new != want_new:
        raise Failed(f"{name}: greedy tokens differ:\n  vllm {got_new}\n  hf   {want_new}")
    log(f"ok   {name}: {len(got_ids)} prompt tokens, log-probs within {worst:.2g}, "
        f"{len(got_new)} greedy tokens equal")


def serve(model_dir, overrides, dtype, eager, prompts, imgs, max_tokens, **engine):
    from vllm import LLM, SamplingParams
    llm = LLM(model=str(model_dir), hf_overrides=overrides, dtype=dtype, enforce_eager=eager,
              max_model_len=2048, gpu_memory_utilization=0.3, limit_mm_per_prompt={"image": 2},
              seed=0, **engine)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=0)
        reqs = [{"prompt": p, "multi_modal_data": {"image": im if len(im) > 1 else im[0]}}
                for p, im in zip(prompts, imgs)]
        return llm.generate(reqs, sp)
    finally:
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()


# --------------------------------------------------------------------------- LLaVA-1.5

def llava_reference(model, proc, prompt, imgs, method, keep, max_tokens, device):
    """(pruned prompt ids, log-probs [L', V] of the next token, greedy new tokens) from
    transformers, pruned by vtkernels.hf (method None: unpruned)."""
    import contextlib

    import vtkernels.hf as vhf
    inputs = proc(images=imgs, text=[prompt], return_tensors="pt").to(device)
    ctx = vhf.pruning(model, method, keep=keep) if method else contextlib.nullcontext()
    with ctx, torch.no_grad():
        logits = model(**inputs).logits[0].float()
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    ids = inputs["input_ids"][0].tolist()
    if method:  # vtkernels.hf drops the pruned placeholders; each image keeps its first `keep`
        img, new, run = model.config.image_token_id, [], 0
        for t in ids:
            run = run + 1 if t == img else 0
            if t != img or run <= keep:
                new.append(t)
        ids = new
    assert len(ids) == logits.shape[0]
    return ids, logits.log_softmax(-1).cpu(), out[0, inputs["input_ids"].shape[1]:].tolist()


def check_llava(args, device, tmp):
    from transformers import AutoProcessor

    from vtkernels.cli import tiny_llava
    from vtkernels.vllm.testing import save_for_vllm
    model, proc = tiny_llava("llava", image_size=224, patch_size=14, vision_hidden=64, vision_layers=4,
                             vision_heads=4, text_hidden=256, text_layers=2, seed=0)
    sharpen(model)
    d = save_for_vllm(model, proc, f"{tmp}/llava")
    # The processor vLLM itself loads from the directory (its image processing can differ from
    # the in-memory one in the last bits).
    proc = AutoProcessor.from_pretrained(d)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    imgs = images(len(LLAVA_PROMPTS))
    for method in (None,) + METHODS:
        want = [llava_reference(model, proc, p, im, method, args.keep, args.max_tokens, device)
                for p, im in zip(LLAVA_PROMPTS, imgs)]
        name = f"llava {method or 'unpruned'}" + (f" keep={args.keep}" if method else "")
        if args.hf_only:
            log(f"hf   {name}: prompts of {[len(w[0]) for w in want]} tokens, greedy {[w[2] for w in want]}")
            continue
        overrides = ({"architectures": ["VtkLlavaForConditionalGeneration"],
                      "vtk_pruning": {"method": method, "keep": args.keep}} if method else None)
        outs = serve(d, overrides, args.dtype, args.eager, LLAVA_PROMPTS, imgs, args.max_tokens)
        for i, (w, o) in enumerate(zip(want, outs)):
            compare(f"{name} prompt {i}", *w, o, args.atol)


# --------------------------------------------------------------------------- Qwen2.5-VL

def qwen_reference(model, proc, prompt, imgs, method, keep, max_tokens, device):
    """As llava_reference, for Qwen2.5-VL pruned by hand (method None: unpruned)."""
    from vtkernels.vllm.testing import qwen_pruned_forward_inputs, qwen_reference as select
    inputs = proc(images=imgs, text=[prompt], return_tensors="pt").to(device)
    with torch.no_grad():
        if method is None:
            logits = model(**inputs).logits[0].float()
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
            return (inputs["input_ids"][0].tolist(), logits.log_softmax(-1).cpu(),
                    out[0, inputs["input_ids"].shape[1]:].tolist())
        sel = select(model, inputs["pixel_values"], inputs["image_grid_thw"], method, {"keep": keep})
        ids, embeds, pos, next_pos = qwen_pruned_forward_inputs(model, inputs, sel)
        logits = model(inputs_embeds=embeds, position_ids=pos).logits[0].float()
        lp = logits.log_softmax(-1).cpu()
        # Greedy decoding without a cache: each new token at the next position of the unpruned
        # sequence on all three M-RoPE rows.
        new, emb = [], model.get_input_embeddings()
        for step in range(max_tokens):
            tok = int(logits[-1].argmax())
            new.append(tok)
            if tok == model.generation_config.eos_token_id:
                break
            embeds = torch.cat([embeds, emb(torch.tensor([[tok]], device=device))], dim=1)
            pos = torch.cat([pos, torch.full((3, 1, 1), next_pos + step, device=device)], dim=2)
            logits = model(inputs_embeds=embeds, position_ids=pos).logits[0].float()
    return ids.tolist(), lp, new


def check_qwen(args, device, tmp):
    from transformers import AutoProcessor

    from vtkernels.vllm.testing import save_for_vllm, tiny_qwen2_5_vl
    model, proc = tiny_qwen2_5_vl(vision_hidden=64, text_hidden=128, max_units=96, seed=0)
    sharpen(model)
    d = save_for_vllm(model, proc, f"{tmp}/qwen2_5_vl")
    proc = AutoProcessor.from_pretrained(d)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    imgs = images(len(QWEN_PROMPTS))
    for method in (None,) + METHODS:
        want = [qwen_reference(model, proc, p, im, method, args.keep, args.max_tokens, device)
                for p, im in zip(QWEN_PROMPTS, imgs)]
        name = f"qwen2.5-vl {method or 'unpruned'}" + (f" keep={args.keep}" if method else "")
        if args.hf_only:
            log(f"hf   {name}: prompts of {[len(w[0]) for w in want]} tokens, greedy {[w[2] for w in want]}")
            continue
        overrides = ({"architectures": ["VtkQwen2_5_VLForConditionalGeneration"],
                      "vtk_pruning": {"method": method, "keep": args.keep}} if method else None)
        # The pruned class needs vLLM's multimodal-pruning mode (docs/vllm.md); no video here.
        engine = {"video_pruning_rate": 0.5} if method else {}
        outs = serve(d, overrides, args.dtype, args.eager, QWEN_PROMPTS, imgs, args.max_tokens, **engine)
        for i, (w, o) in enumerate(zip(want, outs)):
            compare(f"{name} prompt {i}", *w, o, args.atol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llava,qwen", help="comma-separated: llava, qwen")
    ap.add_argument("--keep", type=int, default=24, help="tokens kept per image (default 24)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--atol", type=float, default=None,
                    help="prompt log-prob tolerance (default 2e-3 in float32, 0.15 otherwise)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs, no compile)")
    ap.add_argument("--hf-only", action="store_true", help="run only the transformers side")
    args = ap.parse_args(argv)
    if args.atol is None:
        args.atol = 2e-3 if args.dtype == "float32" else 0.15
    cuda = torch.cuda.is_available()
    if not args.hf_only:
        if not cuda:
            print("vllm_gpu: no CUDA GPU visible to torch: the vLLM check serves models on a GPU "
                  "(use --hf-only to run the transformers side here)", file=sys.stderr)
            return 2
        try:
            import vllm  # noqa: F401
        except Exception as e:
            print(f"vllm_gpu: vllm is not importable ({type(e).__name__}: {e}); "
                  "pip install 'vtkernels[vllm]'", file=sys.stderr)
            return 2
    device = torch.device("cuda" if cuda else "cpu")
    checks = {"llava": check_llava, "qwen": check_qwen}
    with tempfile.TemporaryDirectory(prefix="vtk-vllm-gpu-") as tmp:
        for name in args.models.split(","):
            if name not in checks:
                print(f"vllm_gpu: unknown model family {name!r}; choose from {', '.join(checks)}",
                      file=sys.stderr)
                return 2
            try:
                checks[name](args, device, tmp)
            except Failed as e:
                print(f"FAIL {e}", file=sys.stderr)
                return 1
    log("vllm_gpu: all checks passed" if not args.hf_only else "vllm_gpu: transformers side ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
