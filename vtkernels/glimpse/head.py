"""GlimpsePrune's learned parts: the glimpse embeddings and the visual importance predictor (VIP).

ALGORITHMS.md ("GlimpsePrune") fixes every shape; the module and parameter names below are the
published checkpoint's state-dict keys (step 6), so a published ``new_modules_gp.pt`` loads
without renaming:

    learnable_embeddings  E [L, 1, H]            one glimpse vector per LLM layer
    le_proj               Linear(H, H)           g(l) = le_norm(le_proj(E[l]))
    le_norm               RMSNorm(H, LLM eps)
    attn_fuser            the VIP: attn_in_proj, cond_in_projs.{i}, layers.{i}.{norm1, attn, norm2,
                          mlp}, attn_out_projs.{3 | 0..3 with deep_supervision}

The checkpoint directory holds config.json (the model's config plus the glimpse fields) and
new_modules_gp.pt (a torch.save dict: "attn_fuser", "learnable_embeddings", "le_proj", "le_norm").
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["GlimpseHead", "VisualImportancePredictor", "RMSNorm", "CHECKPOINT_FILE", "CONFIG_FILE",
           "GLIMPSE_FIELDS"]

CHECKPOINT_FILE = "new_modules_gp.pt"
CONFIG_FILE = "config.json"

# Glimpse fields of the published config.json, with the defaults of an untrained head.
GLIMPSE_FIELDS = ("reduce_layer", "selected_layers", "selected_visual_layers", "attn_fuse_size",
                  "visual_cond_size", "attn_fuse_num_heads", "reduce_threshold", "min_remain_num",
                  "max_remain_ratio", "use_attention_logits", "le_length", "le_layers",
                  "deep_supervision")

# Published K for the published model sizes: (LLM layers, LLM width) -> K. Other sizes: 2/3 depth.
_PUBLISHED_K = {(32, 4096): 21, (40, 5120): 26, (28, 3584): 18, (36, 2048): 23}
# Published condition layers and the depth they were chosen for. LLaVA-1.5: CLIP hidden_states
# indices (hidden_states[i] = output of layer i - 1); Qwen2.5-VL: vision block indices.
_LLAVA_CONDITIONS, _LLAVA_DEPTH = (23, 17, 11, 5), 24
_QWEN_CONDITIONS, _QWEN_DEPTH = (31, 23, 15, 7), 32


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_reduce_layer(num_layers: int, hidden_size: int) -> int:
    """K: the published value for a published LLM size, else round(2/3 of the depth)."""
    k = _PUBLISHED_K.get((num_layers, hidden_size))
    if k is None:
        k = _round_half_up(2 * num_layers / 3)
    return max(0, min(k, num_layers - 1))


def default_condition_layers(family: str, depth: int) -> List[int]:
    """The 4 condition layers, deepest first, at the published fractions of the tower's depth.

    LLaVA: hidden_states indices 23, 17, 11, 5 of a 24-layer CLIP, i.e. round(i * depth / 24),
    at least 1 (never the patch embedding). Qwen2.5-VL: blocks 31, 23, 15, 7 of 32, i.e. the block
    whose output count is round((b + 1) * depth / 32)."""
    if family == "llava":
        return [min(depth, max(1, _round_half_up(i * depth / _LLAVA_DEPTH))) for i in _LLAVA_CONDITIONS]
    if family == "qwen2_5_vl":
        return [min(depth, max(1, _round_half_up((b + 1) * depth / _QWEN_DEPTH))) - 1 for b in _QWEN_CONDITIONS]
    raise ValueError(f"unknown model family {family!r}")


class RMSNorm(nn.Module):
    """RMSNorm as the Llama family computes it: statistics in float32 (float64 stays float64),
    the weight applied in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(dt)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def grid_rotary(rows: int, cols: int, head_dim: int, dtype: torch.dtype, device) -> Tuple[Tensor, Tensor]:
    """cos, sin [rows * cols, head_dim] of the VIP's 2D rotary (raster order).

    f_j = 10000^(-2j / (head_dim / 2)), j < head_dim / 4; angles = concat(row * f, col * f),
    duplicated to head_dim (rotate-half form). ALGORITHMS.md asks for float32 or wider: the
    angles are computed here in ``dtype``, which callers keep at float32 or float64."""
    if head_dim % 4:
        raise ValueError(f"2D rotary needs a head size divisible by 4, got {head_dim}")
    half = head_dim // 2
    j = torch.arange(half // 2, dtype=dtype, device=device)
    f = 10000.0 ** (-2.0 * j / half)
    r = torch.arange(rows, dtype=dtype, device=device).repeat_interleave(cols)
    c = torch.arange(cols, dtype=dtype, device=device).repeat(rows)
    ang = torch.cat((r[:, None] * f, c[:, None] * f), dim=-1)
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos(), ang.sin()


class _Attention(nn.Module):
    """Attention over the tokens of one image, q/k from concat(RMSNorm(h), c), v from RMSNorm(h)."""

    def __init__(self, width: int, cond: int, heads: int):
        super().__init__()
        qk = width + cond
        if qk % heads or width % heads:
            raise ValueError(f"attn_fuse_num_heads={heads} must divide {qk} (q/k) and {width} (v)")
        self.heads = heads
        self.q_proj = nn.Linear(qk, qk, bias=False)
        self.k_proj = nn.Linear(qk, qk, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, c: Tensor, grid: Tuple[int, int]) -> Tensor:
        n, N, _ = x.shape
        u = torch.cat((x, c), dim=-1)
        q = self.q_proj(u).view(n, N, self.heads, -1).transpose(1, 2)
        k = self.k_proj(u).view(n, N, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(n, N, self.heads, -1).transpose(1, 2)
        d = q.shape[-1]
        # Rotary, logits and softmax in float32 or wider (ALGORITHMS.md); the weighted sum of v in
        # the module's dtype.
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = grid_rotary(grid[0], grid[1], d, dt, q.device)
        q = q.to(dt)
        k = k.to(dt)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        o = torch.matmul(p.to(v.dtype), v).transpose(1, 2).reshape(n, N, -1)
        return self.o_proj(o)


class _MLP(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, inner)
        self.up_proj = nn.Linear(width, inner)
        self.down_proj = nn.Linear(inner, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, width: int, cond: int, heads: int):
        super().__init__()
        self.norm1 = RMSNorm(width, 1e-6)
        self.attn = _Attention(width, cond, heads)
        self.norm2 = RMSNorm(width, 1e-6)
        self.mlp = _MLP(width, 2 * width)

    def forward(self, h: Tensor, c: Tensor, grid: Tuple[int, int]) -> Tensor:
        h = h + self.attn(self.norm1(h), c, grid)
        return h + self.mlp(self.norm2(h))


class VisualImportancePredictor(nn.Module):
    """The VIP head (ALGORITHMS.md step 3): one logit per image token from the glimpse's attention
    A [n, N, Hq] and the vision-tower conditions (deepest first), on each image's token grid."""

    def __init__(self, num_heads_llm: int, vision_width: int, num_conditions: int = 4, width: int = 256,
                 cond: int = 512, heads: int = 4, deep_supervision: bool = False):
        super().__init__()
        self.attn_in_proj = nn.Linear(num_heads_llm, width)
        self.cond_in_projs = nn.ModuleList(nn.Linear(vision_width, cond) for _ in range(num_conditions))
        self.layers = nn.ModuleList(_Block(width, cond, heads) for _ in range(num_conditions))
        # Keys "attn_out_projs.{i}": only the last block's layer unless deep_supervision.
        outs = range(num_conditions) if deep_supervision else [num_conditions - 1]
        self.attn_out_projs = nn.ModuleDict({str(i): nn.Linear(width, 1) for i in outs})

    def forward(self, attn: Tensor, conditions: Sequence[Tensor], grid: Tuple[int, int],
                all_layers: bool = False):
        """attn [n, N, Hq]; conditions: one [n, N, width] per block (deepest first); grid (rows,
        cols), rows * cols = N. Returns the last block's logits [n, N] (float32), or with
        ``all_layers`` a dict block index -> logits for every block that has an out layer."""
        if len(conditions) != len(self.layers):
            raise ValueError(f"the VIP takes {len(self.layers)} conditions, got {len(conditions)}")
        n, N, _ = attn.shape
        if grid[0] * grid[1] != N:
            raise ValueError(f"grid {grid} does not hold the {N} tokens of an image")
        dtype = self.attn_in_proj.weight.dtype
        h = self.attn_in_proj(attn.to(dtype))
        out = {}
        for i, (block, proj, c) in enumerate(zip(self.layers, self.cond_in_projs, conditions)):
            h = block(h, proj(c.to(dtype)), grid)
            if all_layers and str(i) in self.attn_out_projs:
                out[i] = self.attn_out_projs[str(i)](h)[..., 0].float()
        if all_layers:
            return out
        return self.attn_out_projs[str(len(self.layers) - 1)](h)[..., 0].float()


# --------------------------------------------------------------------------- model description

def _cfg_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    return config.to_dict()


def _text_dims(cfg: dict) -> dict:
    """LLM width, depth, query heads and RMSNorm eps from a model config dict (HF LLaVA /
    Qwen2.5-VL: text_config; original LLaVA and older Qwen: top level)."""
    t = cfg.get("text_config") or cfg
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if t.get(k) is None]
    if missing:
        raise ValueError(f"model config lacks the language model's {', '.join(missing)}")
    return {"hidden_size": int(t["hidden_size"]), "num_layers": int(t["num_hidden_layers"]),
            "num_heads": int(t["num_attention_heads"]), "rms_norm_eps": float(t.get("rms_norm_eps", 1e-6))}


def _vision_dims(cfg: dict) -> dict:
    """Vision-tower width (of the conditions) and depth; depth None where the config does not say
    (original-LLaVA configs carry only mm_hidden_size)."""
    v = cfg.get("vision_config") or {}
    width = v.get("hidden_size") or cfg.get("mm_hidden_size")
    depth = v.get("num_hidden_layers") or v.get("depth")
    if width is None:
        raise ValueError("model config lacks the vision tower's width (vision_config.hidden_size)")
    return {"width": int(width), "depth": None if depth is None else int(depth)}


def _family(cfg: dict) -> str:
    mt = cfg.get("model_type", "")
    if mt.startswith("qwen2_5_vl"):
        return "qwen2_5_vl"
    return "llava"


class GlimpseHead(nn.Module):
    """GlimpsePrune's trainable parts for one model: glimpse embeddings E, le_proj, le_norm, and
    the VIP (``attn_fuser``). ``config`` is the published config.json as a dict: the model's
    config plus the glimpse fields (GLIMPSE_FIELDS)."""

    def __init__(self, config: dict):
        super().__init__()
        config = copy.deepcopy(dict(config))
        text, vision = _text_dims(config), _vision_dims(config)
        L, H, Hq = text["num_layers"], text["hidden_size"], text["num_heads"]
        K = config.get("reduce_layer")
        if isinstance(K, bool) or not isinstance(K, int) or not 0 <= K < L:
            raise ValueError(f"reduce_layer (K) must be an int in [0, {L - 1}] for a {L}-layer LLM, got {K!r}")
        if config.get("selected_layers") not in (None, [K]):
            raise ValueError(f"selected_layers must be [reduce_layer] = [{K}], got {config['selected_layers']!r}")
        le_length = config.get("le_length", 1)
        if le_length != 1:
            raise ValueError(f"only le_length = 1 (one glimpse token) is supported, got {le_length!r}")
        le_layers = config.get("le_layers", L)
        if isinstance(le_layers, int):
            le_layers = list(range(le_layers))
        if list(le_layers) != list(range(L)):
            raise ValueError(f"le_layers must be every LLM layer (0..{L - 1}), got {config.get('le_layers')!r}")
        sel = config.get("selected_visual_layers")
        if not isinstance(sel, (list, tuple)) or not sel or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in sel):
            raise ValueError(f"selected_visual_layers must be a non-empty list of ints, got {sel!r}")
        thr = config.get("reduce_threshold", 0.5)
        check_options(0.5 if thr is None else thr, config.get("min_remain_num", 1), config.get("max_remain_ratio"))
        config.update(selected_layers=[K], le_length=1, le_layers=list(range(L)),
                      selected_visual_layers=list(sel))
        for name, default in (("attn_fuse_size", 256), ("visual_cond_size", 512), ("attn_fuse_num_heads", 4),
                              ("reduce_threshold", 0.5), ("min_remain_num", 1), ("max_remain_ratio", None),
                              ("use_attention_logits", _family(config) == "qwen2_5_vl"),
                              ("deep_supervision", False)):
            if config.get(name) is None:
                config[name] = default
        self.config = config
        self.learnable_embeddings = nn.Parameter(torch.zeros(L, 1, H))
        self.le_proj = nn.Linear(H, H)
        self.le_norm = RMSNorm(H, text["rms_norm_eps"])
        self.attn_fuser = VisualImportancePredictor(
            Hq, vision["width"], num_conditions=len(sel), width=int(config["attn_fuse_size"]),
            cond=int(config["visual_cond_size"]), heads=int(config["attn_fuse_num_heads"]),
            deep_supervision=bool(config["deep_supervision"]))
        nn.init.normal_(self.learnable_embeddings, std=0.02)

    # -- the fields, typed
    @property
    def reduce_layer(self) -> int:
        return self.config["reduce_layer"]

    @property
    def selected_visual_layers(self) -> List[int]:
        return list(self.config["selected_visual_layers"])

    @property
    def reduce_threshold(self) -> float:
        return float(self.config["reduce_threshold"])

    @property
    def min_remain_num(self) -> int:
        return int(self.config["min_remain_num"])

    @property
    def max_remain_ratio(self) -> Optional[float]:
        r = self.config.get("max_remain_ratio")
        return None if r is None else float(r)

    @property
    def use_attention_logits(self) -> bool:
        return bool(self.config["use_attention_logits"])

    # -- construction
    @classmethod
    def for_model(cls, model, reduce_layer: Optional[int] = None, **fields) -> "GlimpseHead":
        """An untrained head with the published defaults for ``model`` (a LLaVA-1.5 or
        Qwen2.5-VL, or its config): K per the published sizes else round(2/3 depth), condition
        layers per ALGORITHMS.md, threshold 0.5, min_keep 1, no cap. ``fields`` override any
        glimpse field. Cast to the model's dtype and device when a model is given."""
        config = getattr(model, "config", model)
        cfg = _cfg_dict(config)
        text, vision = _text_dims(cfg), _vision_dims(cfg)
        family = _family(cfg)
        unknown = sorted(set(fields) - set(GLIMPSE_FIELDS))
        if unknown:
            raise ValueError(f"unknown glimpse fields {unknown}; known: {list(GLIMPSE_FIELDS)}")
        K = default_reduce_layer(text["num_layers"], text["hidden_size"]) if reduce_layer is None else reduce_layer
        sel = fields.pop("selected_visual_layers", None)
        if sel is None:
            if vision["depth"] is None:
                raise ValueError("the model config does not give the vision tower's depth: pass selected_visual_layers")
            sel = default_condition_layers(family, vision["depth"])
        full = dict(cfg)
        full.update(reduce_layer=K, selected_layers=[K], selected_visual_layers=list(sel), attn_fuse_size=256,
                    visual_cond_size=512, attn_fuse_num_heads=4, reduce_threshold=0.5, min_remain_num=1,
                    max_remain_ratio=None, use_attention_logits=family == "qwen2_5_vl", le_length=1,
                    le_layers=list(range(text["num_layers"])), deep_supervision=False)
        full.update(fields)
        head = cls(full)
        if isinstance(model, nn.Module):
            p = next(model.parameters())
            head.to(device=p.device, dtype=p.dtype)
        return head

    def check_model(self, model) -> None:
        """Raises ValueError when this head was built for another model (LLM width, depth, query
        heads; vision width and depth; condition layers outside the tower)."""
        cfg = _cfg_dict(getattr(model, "config", model))
        mine_t, mine_v = _text_dims(self.config), _vision_dims(self.config)
        t, v = _text_dims(cfg), _vision_dims(cfg)
        bad = [f"{what} {a} (head) != {b} (model)" for what, a, b in (
            ("LLM hidden size", mine_t["hidden_size"], t["hidden_size"]),
            ("LLM layers", mine_t["num_layers"], t["num_layers"]),
            ("LLM attention heads", mine_t["num_heads"], t["num_heads"]),
            ("vision width", mine_v["width"], v["width"]),
        ) if a != b]
        if mine_v["depth"] is not None and v["depth"] is not None and mine_v["depth"] != v["depth"]:
            bad.append(f"vision layers {mine_v['depth']} (head) != {v['depth']} (model)")
        if _family(self.config) != _family(cfg):
            bad.insert(0, f"model family {_family(self.config)} (head, model_type "
                          f"{self.config.get('model_type')!r}) != {_family(cfg)} (model, {cfg.get('model_type')!r})")
        if bad:
            raise ValueError("GlimpseHead was built for another model: " + "; ".join(bad))
        depth = v["depth"]
        if depth is not None:
            # LLaVA: hidden_states indices 0..depth (negative: from the end); Qwen: blocks 0..depth-1.
            hi = depth + 1 if _family(cfg) == "llava" else depth
            out = [i for i in self.selected_visual_layers if not -hi <= i < hi]
            if out:
                raise ValueError(f"selected_visual_layers {out} lie outside the {depth}-layer vision tower")

    # -- the glimpse
    def glimpse_embeddings(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """g(l) = le_norm(le_proj(E[l])) for every layer: [L, H] (in ``dtype`` if given)."""
        g = self.le_norm(self.le_proj(self.learnable_embeddings[:, 0]))
        return g if dtype is None else g.to(dtype)

    def predict(self, attn: Tensor, conditions: Sequence[Tensor], grid: Tuple[int, int]) -> Tensor:
        """VIP logits [n, N] (float32) of the last block; see VisualImportancePredictor."""
        return self.attn_fuser(attn, conditions, grid)

    def predict_images(self, attn: Tensor, conditions: Sequence[Tensor],
                       dims: Sequence[Tuple[int, int]]) -> List[Tensor]:
        """VIP logits of images of different grids (Qwen2.5-VL): ``attn`` [U, Hq] and each condition
        [U, C] hold the images' tokens one image after another, ``dims`` their (rows, cols).
        The images of one grid go through ``predict`` together (in their order). Returns one
        [rows * cols] float32 tensor per image, in ``dims``' order."""
        sizes = [r * c for r, c in dims]
        if sum(sizes) != attn.shape[0] or any(c.shape[0] != attn.shape[0] for c in conditions):
            raise ValueError(f"the grids {list(dims)} hold {sum(sizes)} tokens; attn has {attn.shape[0]}, the "
                             f"conditions {[c.shape[0] for c in conditions]}")
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, d in enumerate(dims):
            groups.setdefault(tuple(d), []).append(i)
        out: List[Optional[Tensor]] = [None] * len(sizes)
        for grid, members in groups.items():
            def take(x: Tensor) -> Tensor:
                return torch.stack([x[starts[i]:starts[i + 1]] for i in members])
            logits = self.predict(take(attn), [take(c) for c in conditions], grid)
            for j, i in enumerate(members):
                out[i] = logits[j]
        return out

    # -- checkpoint I/O (published format)
    def published_state(self) -> Dict[str, object]:
        """The dict new_modules_gp.pt holds."""
        return {"attn_fuser": self.attn_fuser.state_dict(),
                "learnable_embeddings": self.learnable_embeddings.detach(),
                "le_proj": self.le_proj.state_dict(),
                "le_norm": self.le_norm.state_dict()}

    def load_published_state(self, state: Dict[str, object]) -> None:
        """Loads a new_modules_gp.pt dict, strictly: a missing, unexpected or mis-shaped key is a
        ValueError naming it."""
        if not isinstance(state, dict):
            raise ValueError(f"{CHECKPOINT_FILE} must hold a dict, got {type(state).__name__}")
        flat: Dict[str, Tensor] = {}
        for top, value in state.items():
            if isinstance(value, dict):
                for k, t in value.items():
                    flat[f"{top}.{k}"] = t
            else:
                flat[str(top)] = value
        want = self.state_dict()
        missing = sorted(set(want) - set(flat))
        unexpected = sorted(set(flat) - set(want))
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        for k in sorted(set(want) & set(flat)):
            t = flat[k]
            if not isinstance(t, Tensor):
                problems.append(f"{k} is a {type(t).__name__}, not a tensor")
            elif tuple(t.shape) != tuple(want[k].shape):
                problems.append(f"{k} has shape {tuple(t.shape)}, expected {tuple(want[k].shape)}")
        if problems:
            raise ValueError("GlimpseHead checkpoint does not fit: " + "; ".join(problems))
        with torch.no_grad():
            for k, p in want.items():
                p.copy_(flat[k])

    def save_pretrained(self, directory) -> None:
        """Writes config.json and new_modules_gp.pt (the published format)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(self.config, f, indent=2, sort_keys=True, default=str)
        state = self.published_state()
        cpu = {k: ({n: t.detach().cpu().clone() for n, t in v.items()} if isinstance(v, dict)
                   else v.detach().cpu().clone()) for k, v in state.items()}
        torch.save(cpu, os.path.join(directory, CHECKPOINT_FILE))

    @classmethod
    def from_pretrained(cls, directory, dtype: Optional[torch.dtype] = None, device=None,
                        model=None) -> "GlimpseHead":
        """Loads a checkpoint directory (published format). With ``model``: checked against it
        and cast to its dtype and device unless ``dtype`` / ``device`` say otherwise."""
        directory = os.fspath(directory)
        paths = [os.path.join(directory, n) for n in (CONFIG_FILE, CHECKPOINT_FILE)]
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"GlimpseHead checkpoint {directory!r} lacks {os.path.basename(p)}")
        try:
            with open(paths[0]) as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"GlimpseHead checkpoint {directory!r}: {CONFIG_FILE} is not readable JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"GlimpseHead checkpoint {directory!r}: {CONFIG_FILE} must hold a JSON object, "
                             f"got {type(config).__name__}")
        head = cls(config)
        try:
            state = torch.load(paths[1], map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises several types for a truncated or foreign file
            raise ValueError(f"GlimpseHead checkpoint {directory!r}: {CHECKPOINT_FILE} is not a readable "
                             f"torch.save file of tensors ({type(e).__name__}: {e})") from e
        if model is not None:
            head.check_model(model)
            p = next(model.parameters())
            dtype = p.dtype if dtype is None else dtype
            device = p.device if device is None else device
        if dtype is None:  # the checkpoint's own dtype
            e = state.get("learnable_embeddings") if isinstance(state, dict) else None
            dtype = e.dtype if isinstance(e, Tensor) and e.is_floating_point() else None
        # Cast before copying the weights in: a float64 checkpoint stays exact in a float64 head.
        head.to(dtype=dtype)
        head.load_published_state(state)
        if device is not None:
            head.to(device=device)
        return head.eval()


def check_options(threshold, min_keep, max_ratio) -> None:
    """Validates the keep rule's options (ALGORITHMS.md step 4)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
    if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
                                  or not 0.0 < float(max_ratio) <= 1.0):
        raise ValueError(f"max_ratio must be None or in (0, 1], got {max_ratio!r}")
