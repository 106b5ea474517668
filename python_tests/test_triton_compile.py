"""Every Triton kernel of vtkernels compiled for sm_90 and sm_80, no GPU needed.

The launchers are called at real shapes (LLaVA-1.5, PruMerge's single head, LLaVA-NeXT's crops,
the Qwen2.5-VL tower; batch up to 64; every dtype) with their kernels replaced by recorders, so
what gets compiled is exactly what each launcher would launch on a CUDA tensor: its block sizes,
warps and compile-time switches (its `_*_config` function) and Triton's own specialisation of
the arguments (strides equal to 1, multiples of 16). Tensors are on the meta device (prumerge,
whose host side reads the scores, gets small CPU tensors). Each distinct launch is compiled once
per target with triton.compile (Triton's bundled ptxas; no CUDA driver), and fails on a compile
error, shared memory above the target's per-block limit, or any register spill.

`make test-triton-compile` (part of `make test`) runs this file against Triton 3.6, what the GPU
machines run, installed beside the venv (VTK_EXPECT_TRITON=3.6.0 makes the test check that this is
the Triton it imported); `make test-triton-compile-venv` against the venv's own Triton. Both set
TRITON_INTERPRET=0: under the interpreter nothing is compiled, so the file skips itself there.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
    pytest.skip("kernels are interpreted here (TRITON_INTERPRET=1); `make test-triton-compile` "
                "runs this file with TRITON_INTERPRET=0", allow_module_level=True)

import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import multiprocessing  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import vtkernels.triton  # noqa: E402
from vtkernels.triton import _launch  # noqa: E402
from vtkernels.triton import prune as TP  # noqa: E402
from vtkernels.triton import scoring as TS  # noqa: E402
from vtkernels.triton import select as TSel  # noqa: E402
from vtkernels.triton import glimpse as TG  # noqa: E402
from vtkernels.triton import varlen as TV  # noqa: E402
from vtkernels import _validate as V  # noqa: E402

# Triton 3.9 warns that its FP-fusion default (on, as in 3.6) will change; the check compiles
# with the default the JIT would use.
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

# Every module of vtkernels/triton: a kernel added anywhere there without a call below fails
# test_every_kernel_is_launched.
MODULES = [importlib.import_module(f"vtkernels.triton.{m.name}")
           for m in pkgutil.iter_modules(vtkernels.triton.__path__)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Dynamic shared memory one block may use (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {90: 232448, 80: 166912}
REGISTERS_PER_SM = 65536
ARCHS = (90, 80)


def _kernels():
    """name -> JITFunction for every kernel (a @triton.jit named *_kernel) of the modules."""
    found = {}
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found[f"{mod.__name__.rsplit('.', 1)[1]}.{name}"] = (mod, name, obj)
    return found


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **meta)` records instead of launching."""

    def __init__(self, key, fn, launches):
        self.key, self.fn, self.launches = key, fn, launches

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((self.key, self.fn, grid, args, meta))
        return launch


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _qk(B, T, C, dtype, fused):
    """q, k as the towers hand them over: separate q_proj/k_proj outputs (CLIP) or views of one
    fused qkv projection (Qwen2.5-VL)."""
    if fused:
        qkv = _meta(B, T, 3 * C, dtype=dtype)
        return qkv[..., :C], qkv[..., C:2 * C]
    return _meta(B, T, C, dtype=dtype), _meta(B, T, C, dtype=dtype)


def _scoring_calls():
    # (B, T, C, H, has_cls, fused): LLaVA-1.5 (16 heads of 64; PruMerge: one head of 1024),
    # LLaVA-NeXT (5 crops), Qwen2.5-VL tower (16 heads of 80, no CLS, up to 16K patches; and
    # the whole 1280-wide width as one head).
    shapes = [(1, 577, 1024, 16, True, False), (64, 577, 1024, 16, True, False),
              (1, 577, 1024, 1, True, False), (64, 577, 1024, 1, True, False),
              (5, 577, 1024, 16, True, False), (5, 577, 1024, 1, True, False),
              (1, 1024, 1280, 16, False, True), (1, 16384, 1280, 16, False, True),
              (1, 16384, 1280, 1, False, True), (4, 4096, 1280, 16, False, True)]
    for dtype in DTYPES:
        for B, T, C, H, has_cls, fused in shapes:
            q, k = _qk(B, T, C, dtype, fused)
            if has_cls:
                yield lambda q=q, k=k, H=H: TS.cls_attention(q, k, H)
            yield lambda q=q, k=k, H=H, c=has_cls: TS.attention_received(q, k, H, None, c)
            yield lambda q=q, k=k, H=H, c=has_cls: TS.fopru_significance(q, k, H, None, c)


def _select_calls():
    # Scores: one LLaVA image (576), LLaVA-NeXT (5 crops of 576 = 2880), Qwen merge units
    # (64 x 64 grid) and patches (128 x 128); grids for FoPru's row strategy.
    grids = [(576, 24), (2880, 48), (4096, 64), (16384, 128)]
    for dtype in DTYPES:
        for B in (1, 64):
            for N, W in grids:
                s = _meta(B, N, dtype=dtype)
                x = _meta(B, N, 1024, dtype=dtype)
                for keep in (1, 64, N // 4):
                    yield lambda s=s, keep=keep: TSel.topk_indices(s, keep)
                    yield lambda x=x, s=s, keep=keep, W=W: TSel.fopru_select(x, s, keep, "row", W)
                yield lambda x=x, s=s: TSel.fopru_select(x, s, 64, "rank")
        # Features: CLIP-L (1024), LLM widths (4096; Qwen2.5-VL-7B 3584); kept counts.
        for B, N, D, K in [(1, 576, 1024, 64), (64, 576, 4096, 144), (5, 576, 4096, 576),
                           (1, 4096, 3584, 1024), (1, 576, 1024, 1)]:
            for idx_dtype in (torch.int64, torch.int32):
                x = _meta(B, N, D, dtype=dtype)
                idx = _meta(B, K, dtype=idx_dtype)
                # _gather: gather_tokens less its range check (which reads the indices).
                yield lambda x=x, idx=idx: TSel._gather(x, idx)


def _prune_calls():
    for dtype in DTYPES:
        for B, N, C in [(1, 576, 1024), (64, 576, 1024), (5, 576, 4096), (1, 4096, 3584)]:
            x, s = _meta(B, N, C, dtype=dtype), _meta(B, N, dtype=dtype)
            for keep, step in [(64, 8), (144, 8), (2, 8), (64, 1)]:
                yield lambda x=x, s=s, keep=keep, step=step: TP.vispruner_select(x, s, keep, 0.5, step)
        # prumerge reads the scores on the host (the kept counts): small CPU tensors. Its tiles
        # depend on N, D and knn only, so batch 1 stands for every batch.
        g = torch.Generator().manual_seed(0)
        for N, D, Ck in [(576, 1024, 1024), (576, 4096, 1024), (4096, 3584, 1280)]:
            x = torch.randn(1, N, D, generator=g).to(dtype)
            keys = torch.randn(1, N, Ck, generator=g).to(dtype)
            s = torch.rand(1, N, generator=g).to(dtype)
            s[0, :8] = 10.0  # a few outliers
            for plus in (False, True):
                yield lambda x=x, keys=keys, s=s, plus=plus: TP.prumerge(x, keys, s, 32, plus)


def _varlen_calls():
    # Qwen2.5-VL tower (width 1280, 16 heads of 80; PruMerge-style single head too), q/k as views
    # of the fused qkv: one 1024 x 1024 px image (5476 patches), 16K patches, a pack of 8 images.
    packs = [[5476], [16384], [64, 100, 256, 1024, 1369, 2304, 4096, 5476]]
    for dtype in DTYPES:
        for lens in packs:
            S = sum(lens)
            q, k = _qk(1, S, 1280, dtype, True)
            q, k = q[0], k[0]
            for cu_dtype in (torch.int32, torch.int64):
                cu = _meta(len(lens) + 1, dtype=cu_dtype)
                for H in (16, 1):
                    yield lambda q=q, k=k, cu=cu, H=H: TV.attention_received_varlen(q, k, cu, H)


def _glimpse_calls():
    # LLaVA-1.5-7B/13B (32/40 heads of 128, no GQA), Qwen2.5-VL-7B (28 query heads over 4 KV
    # heads) and -3B (16 over 2); caches of a prompt with one image and with several images.
    for dtype in DTYPES:
        for B, Hq, Hkv, L, D in [(1, 32, 32, 700, 128), (8, 32, 32, 700, 128), (1, 40, 40, 700, 128),
                                 (1, 28, 4, 1500, 128), (8, 28, 4, 6000, 128), (1, 16, 2, 16500, 128)]:
            q = _meta(B, Hq, D, dtype=dtype)
            k = _meta(B, Hkv, L, D, dtype=dtype)
            mask = _meta(B, L, dtype=torch.bool)
            yield lambda q=q, k=k: TG.glimpse_logits(q, k)
            yield lambda q=q, k=k, mask=mask: TG.glimpse_logits(q, k, None, mask, True)
        # gather_cache: the 22 pruned layers' K and V of a 7B cache (32 x 128 and 8 x 128 KV heads),
        # plus the hidden states [B, L, 4096].
        for B, H, L, M in [(1, 32, 700, 70), (8, 8, 700, 350), (1, 4, 6000, 600)]:
            cache = [_meta(B, H, L, 128, dtype=dtype) for _ in range(44)] + [_meta(B, L, 4096, dtype=dtype)]
            idx = _meta(B, M, dtype=torch.int64)
            yield lambda cache=cache, idx=idx: TG.gather_cache(cache, idx)


def _record_launches():
    """(kernels, launches): every kernel launch the calls above make, recorded, not run."""
    launches = []
    kernels = _kernels()
    with pytest.MonkeyPatch.context() as mp:
        for key, (mod, name, fn) in kernels.items():
            mp.setattr(mod, name, _Recorder(key, fn, launches))
        # The data-dependent argument checks read values the meta tensors don't have.
        mp.setattr(V, "check_cu_seqlens_values", lambda *a: None)
        mp.setattr(V, "check_gather_cache_range", lambda *a: None)
        for call in (*_scoring_calls(), *_select_calls(), *_prune_calls(), *_varlen_calls(), *_glimpse_calls()):
            call()
    return kernels, launches


def _specialise(fn, args, meta, target):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them at launch:
    Triton's own binder (integers equal to 1 become constants, multiples of 16 and aligned
    pointers get divisibility hints) and option parsing for the target."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, opts)
    return signature, constexprs, attrs, options


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _compile(fn, signature, constexprs, attrs, options, target):
    """Compiles one launch; returns its resources (Triton's shared memory, ptxas's report)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v output
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    text = log.getvalue()
    res = {"shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps}
    for k, pat in _PTXAS.items():
        values = [int(v) for v in pat.findall(text)]
        if not values:
            raise RuntimeError(f"no '{k}' in the ptxas report of {fn.__name__}:\n{text}")
        res[k] = max(values)
    return res


_JOBS = []  # filled before the worker processes fork, read by them


def _run_job(i):
    key, fn, arch, spec, _ = _JOBS[i]
    start = time.time()
    try:
        res = _compile(fn, *spec, GPUTarget("cuda", arch, 32))
        res["seconds"] = time.time() - start
        return i, res, None
    except Exception as e:  # a compile error is a finding: reported with its configuration
        return i, None, f"{type(e).__name__}: {e}"[:3000]


@pytest.fixture(scope="module")
def compiled():
    """(kernels, launches, {arch: [(key, config, resources or None, error or None)]}, seconds).

    Each distinct launch (kernel, argument types and specialisation, constexprs, options) is
    compiled once per target, in forked workers (one per CPU, or VTK_COMPILE_JOBS): the parent
    never compiles, so each worker starts with no LLVM or MLIR state, and a worker that dies
    fails the run (BrokenProcessPool) instead of hanging it.
    """
    kernels, launches = _record_launches()
    _JOBS.clear()
    seen = set()
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        for key, fn, grid, args, meta in launches:
            spec = _specialise(fn, args, meta, target)
            sig, constexprs, attrs, options = spec
            ident = (arch, key, repr(sorted(sig.items())), repr(sorted(constexprs.items())),
                     repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            if ident not in seen:
                seen.add(ident)
                _JOBS.append((key, fn, arch, spec, dict(meta)))
    results = {arch: [] for arch in ARCHS}
    start = time.time()
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory(prefix="vtk-triton-") as cache:
        mp.setenv("TRITON_CACHE_DIR", cache)
        mp.setenv("TRITON_DUMP_PTXAS_LOG", "1")
        mp.setenv("TRITON_ALWAYS_COMPILE", "1")
        workers = int(os.environ.get("VTK_COMPILE_JOBS", "0")) or len(os.sched_getaffinity(0))
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for i, res, err in pool.map(_run_job, range(len(_JOBS))):
                key, _, arch, _, meta = _JOBS[i]
                results[arch].append((key, meta, res, err))
    return kernels, launches, results, time.time() - start


def test_triton_is_the_intended_one(capsys):
    expected = os.environ.get("VTK_EXPECT_TRITON")
    with capsys.disabled():
        print(f"\n[triton-compile] triton {triton.__version__} from {os.path.dirname(triton.__file__)}")
    if expected:
        assert triton.__version__ == expected, (triton.__version__, triton.__file__)


def test_every_kernel_is_launched(compiled):
    kernels, launches, _, _ = compiled
    launched = {key for key, *_ in launches}
    assert kernels and set(kernels) == launched, sorted(set(kernels) - launched)
    # The launchers chose their GPU configurations (the interpreter's tiles ignore register
    # and shared-memory limits).
    assert not _launch.interpreting()


def _show(config):
    return {k: (v if isinstance(v, (int, bool)) else str(v)) for k, v in config.items()}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_kernels_compile_within_resources(arch, compiled, capsys):
    kernels, launches, results, seconds = compiled
    problems, worst, busy = [], {}, defaultdict(float)
    for key, config, res, err in sorted(results[arch], key=lambda r: r[0]):
        where = f"{key} {_show(config)}"
        if err is not None:
            problems.append(f"{where}: compile error {err}")
            continue
        threads = res["num_warps"] * 32
        if res["shared"] > SHARED_LIMIT[arch]:
            problems.append(f"{where}: {res['shared']} bytes shared > {SHARED_LIMIT[arch]}")
        if res["spill_stores"] or res["spill_loads"]:
            problems.append(f"{where}: spills {res['spill_stores']} B stored, "
                            f"{res['spill_loads']} B loaded ({res['regs']} registers)")
        if res["regs"] * threads > REGISTERS_PER_SM:
            problems.append(f"{where}: {res['regs']} registers x {threads} threads")
        busy[key] += res["seconds"]
        if key not in worst or (res["shared"], res["regs"]) > (worst[key][0]["shared"], worst[key][0]["regs"]):
            worst[key] = (res, config)
    with capsys.disabled():
        print(f"\n[triton-compile] sm_{arch}, triton {triton.__version__}: {len(results[arch])} distinct "
              f"launches of {len(launches)} recorded (all targets compiled in {seconds:.0f} s); "
              f"largest per kernel:")
        for key in sorted(worst):
            res, config = worst[key]
            print(f"  {key:34s} shared {res['shared']:6d} B  regs {res['regs']:3d}  "
                  f"spills {res['spill_stores']}/{res['spill_loads']} B  stack {res['stack']} B  "
                  f"({busy[key]:.0f} s compiling)  {_show(config)}")
    assert set(worst) | {p.split()[0] for p in problems} == set(kernels)
    assert not problems, "\n".join(problems)
