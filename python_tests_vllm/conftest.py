"""Fixtures for the vLLM plugin tests: vLLM 0.33 on the CPU, tiny models built offline.

Run by `make test-vllm` in its own venv (.venv-vllm: vLLM pins its own torch). Without vLLM
every test here skips. The models are loaded by vLLM's own loader into vLLM's model classes,
in this process (one rank, gloo), which is what a vLLM worker does before serving.
"""
import os
import socket

# Before vLLM is imported anywhere: registry, processors and model classes then run on a CPU
# machine (the vLLM wheel is a CUDA build; without a GPU it would not pick a platform).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Without vLLM every test module skips itself (pytest.importorskip at its top).
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


# --------------------------------------------------------------------------- CPU stand-ins
# vLLM's CUDA wheel ships no CPU kernels. CLIP's QuickGELU looks up torch.ops._C.gelu_quick
# when it is constructed (and its CPU path then computes x * sigmoid(1.702 x) natively). The op
# is defined here, for the tests only, with that same formula; the plugin never does this.
_stand_ins = []


def _define_missing_c_ops():
    try:
        torch.ops._C.gelu_quick
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("gelu_quick(Tensor(a!) out, Tensor input) -> ()")

    def gelu_quick(out, x):
        out.copy_(x * torch.sigmoid(1.702 * x))

    lib.impl("gelu_quick", gelu_quick, "CPU")
    _stand_ins.append(lib)


if HAVE_VLLM:
    _define_missing_c_ops()


# --------------------------------------------------------------------------- distributed state

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_world = []


def _ensure_world(cfg):
    """One rank, tensor parallel 1, on gloo: what a CPU worker sets up before loading a model."""
    if _world:
        return
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    initialize_model_parallel(1, 1)
    _world.append(True)


@pytest.fixture(scope="session", autouse=True)
def _close_world():
    yield
    if _world:
        from vllm.distributed import destroy_distributed_environment, destroy_model_parallel
        destroy_model_parallel()
        destroy_distributed_environment()


def engine_config(model_dir, arch, pruning, **kwargs):
    """vLLM's VllmConfig for ``model_dir`` served as ``arch`` with ``vtk_pruning=pruning``, the
    way ``LLM(model_dir, hf_overrides=...)`` builds it."""
    from vllm.engine.arg_utils import EngineArgs
    overrides = {"architectures": [arch]}
    if pruning is not None:
        overrides["vtk_pruning"] = pruning
    args = EngineArgs(model=str(model_dir), hf_overrides=overrides, dtype="float32",
                      enforce_eager=True, max_model_len=1024, **kwargs)
    return args.create_engine_config()


def load_model(cfg):
    """The model as a vLLM worker builds it: vLLM's loader, vLLM's weight mapping."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model
    with set_current_vllm_config(cfg):
        _ensure_world(cfg)
        return get_model(vllm_config=cfg).eval()


def picture(seed, h, w):
    """Blocky random picture: regions of colour give the encoder something to attend to."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    im = Image.fromarray(blocks).resize((w, h), Image.NEAREST)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-20, 20, size=(h, w, 1))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def processor(cfg):
    from vllm.multimodal import MULTIMODAL_REGISTRY
    return MULTIMODAL_REGISTRY.create_processor(cfg.model_config)


def process(proc, prompt, images):
    """vLLM's multimodal processing of one prompt: (prompt ids, placeholder ranges, mm kwargs)."""
    items = proc.info.parse_mm_data({"image": images})
    out = proc(prompt, items)
    return out["prompt_token_ids"], out["mm_placeholders"]["image"], out["mm_kwargs"]["image"]
