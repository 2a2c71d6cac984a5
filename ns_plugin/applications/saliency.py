"""Saliency maps for timm vision transformers, without editing timm (OpenReview:d8VrVfNARSy §7 Fig. 5b and A.4 Fig. 7).

Three methods, each returning one map per image on the patch grid ``(N, gh, gw)``:

* :func:`attention_rollout` — Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers":
  per block the head-averaged attention with the residual connection folded in, ``0.5 A + 0.5 I`` (rows
  renormalised), multiplied over the blocks; the map is the cls token's row over the patch tokens.
* :func:`grad_cam` — Grad-CAM (Selvaraju et al. 2017) on the tokens entering the last block's attention
  (``blocks[-1].norm1`` output): channel weights are the patch-averaged gradients of the class logit,
  the map is ``ReLU(sum_c alpha_c A_c)`` per patch token. The *output* of the last block is not used
  because with cls-token pooling the head reads only the cls token, so the gradient on the patch tokens
  there is identically zero (the same choice pytorch-grad-cam documents for ViTs).
* :func:`chefer_relevance` — gradient-weighted attention relevance of Chefer et al. (R = I, then per block
  ``R <- R + mean_h((dy_c/dA ⊙ A)^+) R``; the map is the cls row over the patch tokens). This is the
  gradient x attention rule of Chefer, Gur & Wolf, "Generic Attention-model Explainability" (ICCV 2021),
  which is the LRP-free form of their CVPR 2021 "Transformer Interpretability Beyond Attention
  Visualization" (there the attention maps are replaced by their LRP relevances). OpenReview:d8VrVfNARSy calls the
  CVPR method "LRP" and shows it in Fig. 5b.

Attention maps are captured with hooks: timm 1.x ``Attention`` computes attention with the fused
``scaled_dot_product_attention`` kernel by default, so :class:`AttentionRecorder` switches each layer's
``fused_attn`` off for the duration (the explicit path is numerically the same) and hooks the
``attn_drop`` module, whose input is the softmaxed attention; the flags are restored on exit.

:func:`map_similarity` compares two maps (Pearson, Spearman, top-k IoU) and :func:`compare_to` gives, for
each method, how similar one image's maps are to two references (e.g. transformed vs source / target).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import AttentionRecorder
from ..errors import NSPluginError

__all__ = ["AttentionRecorder", "attention_maps", "attention_rollout", "grad_cam", "chefer_relevance",
           "saliency_maps", "map_similarity", "compare_to", "upsample", "METHODS"]

METHODS = ("rollout", "gradcam", "chefer")


def _vit(model: nn.Module):
    from ..models import unwrap

    _, core = unwrap(model)
    blocks = getattr(core, "blocks", None)
    if blocks is None or len(blocks) == 0 or not all(
            hasattr(getattr(b, "attn", None), "attn_drop") and hasattr(b.attn, "fused_attn") for b in blocks):
        raise NSPluginError(f"{type(core).__name__} is not a timm VisionTransformer-style model (blocks with a "
                            f"timm Attention: `attn.fused_attn` and `attn.attn_drop`); saliency maps need one")
    return core


def _layout(core, n_tokens: int):
    prefix = int(getattr(core, "num_prefix_tokens", 1 if getattr(core, "cls_token", None) is not None else 0))
    n_patch = n_tokens - prefix
    grid = getattr(getattr(core, "patch_embed", None), "grid_size", None)
    if grid is None or grid[0] * grid[1] != n_patch:
        side = int(round(n_patch ** 0.5))
        if side * side != n_patch:
            raise NSPluginError(f"cannot arrange {n_patch} patch tokens on a grid; pass a square input")
        grid = (side, side)
    return prefix, (int(grid[0]), int(grid[1]))


def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(logits.shape[0])
    if t.numel() != logits.shape[0] or int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
        raise NSPluginError(f"target must be one class or one per image in [0, {logits.shape[1]}), got {target}")
    return t


def _check_x(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise NSPluginError(f"x must be an image batch (N, C, H, W), got "
                            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise NSPluginError("x contains NaN or inf")
    return x.unsqueeze(0) if x.dim() == 3 else x


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Attention probabilities of every block, ``[(B, h, N, N)]``, for images ``x`` (model in eval mode)."""
    x = _check_x(x).to(_device(model))
    _vit(model)  # a clear error for models without timm attention blocks
    with AttentionRecorder(model) as rec:
        model(x)
    return rec.attn


def _cls_row(r: torch.Tensor, core) -> torch.Tensor:
    prefix, (gh, gw) = _layout(core, r.shape[-1])
    if prefix == 0:  # no cls token: average relevance received by each patch token
        return r.mean(1).reshape(-1, gh, gw)
    return r[:, 0, prefix:].reshape(-1, gh, gw)


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor, *, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): ``(N, gh, gw)`` maps.

    ``residual`` is the weight of the identity added to each block's head-averaged attention (0.5 as in the
    paper); rows are renormalised before multiplying the blocks from first to last.
    """
    core = _vit(model)
    if not 0 <= residual < 1:
        raise NSPluginError(f"residual must be in [0, 1), got {residual}")
    maps = attention_maps(model, x)
    r = None
    for a in maps:
        a = a.double().mean(1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = (1 - residual) * a + residual * eye
        a = a / a.sum(-1, keepdim=True)
        r = a if r is None else a @ r
    return _cls_row(r, core).float()


def grad_cam(model: nn.Module, x: torch.Tensor, target=None) -> torch.Tensor:
    """Grad-CAM on the last block's input tokens (``blocks[-1].norm1`` output; see the module docstring):
    ``(N, gh, gw)`` maps for class ``target`` (default: the predicted class)."""
    core = _vit(model)
    x = _check_x(x).to(_device(model))
    store = {}

    def hook(mod, inp, out):
        store["act"] = out

    layer = getattr(core.blocks[-1], "norm1", None) or core.blocks[-1]
    h = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            logits = model(xi)
            t = _targets(logits, target)
            (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store["act"])
    finally:
        h.remove()
    act = store["act"].detach()
    prefix, (gh, gw) = _layout(core, act.shape[1])
    act, grad = act[:, prefix:], grad[:, prefix:]
    alpha = grad.mean(1, keepdim=True)                 # (B, 1, C): channel weights
    cam = F.relu((alpha * act).sum(-1))                 # (B, P)
    return cam.reshape(-1, gh, gw).float()


def chefer_relevance(model: nn.Module, x: torch.Tensor, target=None) -> torch.Tensor:
    """Gradient-weighted attention relevance (Chefer et al. 2021; see the module docstring):
    ``(N, gh, gw)`` maps for class ``target`` (default: the predicted class)."""
    core = _vit(model)
    x = _check_x(x).to(_device(model))
    with AttentionRecorder(model, grads=True) as rec, torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)
        logits = model(xi)
        t = _targets(logits, target)
        rec.gradients(logits.gather(1, t[:, None]).sum())
    n = rec.attn[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64, device=x.device).expand(x.shape[0], n, n).clone()
    for a, g in zip(rec.attn, rec.grad):
        cam = (g.double() * a.double()).clamp_min(0).mean(1)
        r = r + cam @ r
    return _cls_row(r, core).float()


def saliency_maps(model: nn.Module, x: torch.Tensor, target=None, *,
                  methods: Sequence[str] = METHODS) -> Dict[str, torch.Tensor]:
    """``{method: (N, gh, gw)}`` for the chosen methods (``rollout``, ``gradcam``, ``chefer``).
    ``target`` (class or one per image, default the prediction) is used by the gradient methods."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise NSPluginError(f"unknown saliency method(s) {bad}; choose from {', '.join(METHODS)}")
    was = model.training
    model.eval()
    try:
        out = {}
        for m in methods:
            if m == "rollout":
                out[m] = attention_rollout(model, x)
            elif m == "gradcam":
                out[m] = grad_cam(model, x, target)
            else:
                out[m] = chefer_relevance(model, x, target)
        return {k: v.cpu() for k, v in out.items()}
    finally:
        model.train(was)


def upsample(maps: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """``(N, gh, gw)`` -> ``(N, H, W)`` for display."""
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode=mode, **kw)[:, 0]


def _rank(v: torch.Tensor) -> torch.Tensor:
    # average ranks for ties (Spearman)
    from scipy.stats import rankdata
    return torch.as_tensor(rankdata(v.cpu().numpy()), dtype=torch.float64)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def map_similarity(a: torch.Tensor, b: torch.Tensor, *, k: Union[float, int] = 0.25) -> Dict[str, float]:
    """Similarity of two saliency maps of the same shape: Pearson and Spearman correlation and the IoU of
    their top-k cells (``k`` a fraction of the cells if < 1, else a count). Constant maps give NaN
    correlations."""
    if a.shape != b.shape:
        raise NSPluginError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    n = a.numel()
    kk = int(round(k * n)) if k < 1 else int(k)
    if not 1 <= kk <= n:
        raise NSPluginError(f"k={k} selects {kk} of {n} cells; choose k in (0, 1) or 1..{n}")
    ta, tb = set(torch.topk(a, kk).indices.tolist()), set(torch.topk(b, kk).indices.tolist())
    return {"pearson": _pearson(a, b), "spearman": _pearson(_rank(a), _rank(b)),
            "topk_iou": len(ta & tb) / len(ta | tb)}


def compare_to(maps: Dict[str, torch.Tensor], refs: Dict[str, Dict[str, torch.Tensor]], *,
               k: Union[float, int] = 0.25) -> Dict[str, Dict[str, Dict[str, float]]]:
    """For each method, mean (over images) similarity of ``maps[method][i]`` to each reference's maps.

    ``refs`` is e.g. ``{"source": maps_source, "target": maps_target}``. Returns
    ``{method: {ref_name: {"pearson", "spearman", "topk_iou"}}}`` (NaNs from constant maps are skipped).
    """
    import math

    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for m, t in maps.items():
        out[m] = {}
        for name, ref in refs.items():
            sims = [map_similarity(t[i], ref[m][i], k=k) for i in range(t.shape[0])]
            agg = {}
            for key in ("pearson", "spearman", "topk_iou"):
                vals = [s[key] for s in sims if not math.isnan(s[key])]
                agg[key] = sum(vals) / len(vals) if vals else float("nan")
            out[m][name] = agg
    return out
