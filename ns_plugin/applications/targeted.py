"""Targeted nullspace noise: source / target / transformed triplets (OpenReview:d8VrVfNARSy §7, A.3, Fig. 5 and A.4 Fig. 7).

A *transformed* image is ``source + v`` with ``v`` in the patch-embedding nullspace, chosen to look like
the *target*: the model sees exactly the source's patch embeddings (so the same prediction, confidence and
— in principle — the same saliency maps) while the pixels move towards another image.

Two transforms are provided (both exact: ``W (transformed - source) = 0`` patch by patch):

* ``mode="project"`` (default): ``source + P_N(target - source)``, the orthogonal projection of the
  pixel difference onto the nullspace (:meth:`PatchNullspace.project`). It is the closest image to the
  target, in l2 per patch, among all images with the source's embedding — the unconstrained minimiser of
  OpenReview:d8VrVfNARSy Eq. 7 with ``p = 2``.
* ``mode="channels"`` (OpenReview:d8VrVfNARSy A.3): keep the target's values in every channel except ``channels``
  (default red only, ``(0,)``, as in the paper) and solve those for the source's embedding,
  ``x_free = target_free + pinv(W_free) W (source - target)`` per patch (least squares, minimum change of
  the free channel). When ``W_free`` cannot reach the needed embedding change (e.g. ViT-B/16: 768
  constraints, 256 red pixels) the match is only least-squares; ``embedding_residual`` reports it.

Both are unconstrained: the result may leave [0, 1]. ``fit="clip"`` clamps it (this leaves the nullspace
and changes the output: the report measures by how much) and ``fit="scale"`` shrinks ``v`` to the largest
multiple keeping ``source + s v`` in [0, 1] (stays exact, moves less towards the target).

:func:`targeted_triplets` takes any ``transform(source, target) -> transformed`` callable (e.g. an attack
from ``ns_plugin.attacks`` wrapped in a lambda) and reports predictions, confidences, pixel distances,
the embedding residual, what clipping does, and the saliency-map similarity of transformed-vs-source and
transformed-vs-target; :func:`plot_triplets` draws them (Fig. 5 / Fig. 7 style).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import NSPluginError

__all__ = ["nullspace_transform", "fit_to_box", "targeted_triplets", "TripletReport", "plot_triplets"]

Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODES = ("project", "channels")
FITS = ("none", "clip", "scale")


def _nullspace(model: nn.Module):
    from ..nullspace.exact import exact_nullspace

    ns = exact_nullspace(model)
    if ns.nullity == 0:
        raise NSPluginError(f"the patch embedding of this model is injective (rank {ns.rank} = patch dim "
                            f"{ns.input_dim}): it has no exact nullspace, so no targeted nullspace noise exists; "
                            f"use an approximate/learnt transform instead")
    return ns


def fit_to_box(source: torch.Tensor, transformed: torch.Tensor, fit: str = "none") -> torch.Tensor:
    """Bring ``transformed`` into [0, 1]: ``"none"`` (unchanged), ``"clip"`` (clamp; leaves the nullspace)
    or ``"scale"`` (``source + s (transformed - source)`` with the largest ``s <= 1`` that fits: stays in
    the nullspace)."""
    if fit not in FITS:
        raise NSPluginError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    if fit == "none":
        return transformed
    if fit == "clip":
        return transformed.clamp(0, 1)
    from ..nullspace.exact import PatchNullspace

    v = transformed - source
    s = PatchNullspace.max_scale(source, v).clamp(max=1.0).to(v.dtype)
    return source + s.reshape(-1, 1, 1, 1) * v


def nullspace_transform(model: nn.Module, *, mode: str = "project", channels: Sequence[int] = (0,),
                        fit: str = "none", rcond: Optional[float] = None) -> Transform:
    """Build the exact targeted-nullspace transform ``(source, target) -> transformed`` for ``model``.

    Args:
        model: a model with a non-overlapping linear patch embedding (see ``exact_nullspace``).
        mode: ``"project"`` (nullspace projection of ``target - source``) or ``"channels"`` (OpenReview:d8VrVfNARSy A.3:
            only ``channels`` are solved for, the others are the target's).
        channels: channel indices solved for in ``"channels"`` mode (default red only).
        fit: ``"none"`` (unconstrained, as in OpenReview:d8VrVfNARSy §7), ``"clip"`` or ``"scale"`` (see :func:`fit_to_box`).
        rcond: ``"channels"`` mode only: singular values of ``W_free`` below ``rcond * s_max`` are dropped in
            the pseudo-inverse (default: torch's ``eps * max(shape)``, the exact least-squares solution).
            When ``W_free`` is ill-conditioned the exact solution has huge pixel values; a larger ``rcond``
            keeps them moderate at the price of a non-zero ``embedding_residual``.
    """
    if mode not in MODES:
        raise NSPluginError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if fit not in FITS:
        raise NSPluginError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    from ..nullspace.exact import solve_channels

    ns = _nullspace(model)
    c = ns.in_chans
    if mode == "channels":
        chans = sorted(set(int(ch) for ch in channels))
        if not chans or chans[0] < 0 or chans[-1] >= c:
            raise NSPluginError(f"channels must be a non-empty subset of 0..{c - 1}, got {tuple(channels)}")
        if rcond is not None and not 0 <= rcond < 1:
            raise NSPluginError(f"rcond must be in [0, 1), got {rcond}")

    def transform(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if source.shape != target.shape:
            raise NSPluginError(f"source and target must have the same shape, got {tuple(source.shape)} "
                                f"and {tuple(target.shape)}")
        s64, t64 = source.double(), target.double()
        if mode == "project":
            out = s64 + ns.project(t64 - s64)
        else:
            out = solve_channels(ns, s64, t64, channels=chans, objective="embedding", rcond=rcond)
        return fit_to_box(s64, out, fit).to(source.dtype)

    transform.nullspace = ns  # type: ignore[attr-defined]
    transform.mode, transform.fit = mode, fit  # type: ignore[attr-defined]
    return transform


def attack_transform(model: nn.Module, **attack_kwargs) -> Transform:
    """The targeted transform of the torchattacks attack :class:`ns_plugin.attacks.TargetedNullspace`
    (box-constrained by default, so the transformed images stay in [0, 1] and in the nullspace), as a
    ``(source, target) -> transformed`` callable for :func:`targeted_triplets`."""
    from ..attacks import TargetedNullspace
    atk = TargetedNullspace(model, **attack_kwargs)

    def transform(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            labels = model(source).argmax(1)
        return atk(source, labels, target_images=target)
    return transform


@dataclass
class TripletReport:
    """Result of :func:`targeted_triplets`: ``summary`` (JSON-able numbers), ``per_image`` (one dict per
    triplet) and the tensors (``source``, ``target``, ``transformed``, ``maps``) for plotting."""
    summary: Dict
    per_image: List[Dict]
    source: torch.Tensor
    target: torch.Tensor
    transformed: torch.Tensor
    maps: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)


def _predict(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        logits = model(x.to(next(model.parameters()).device)).double().cpu()
    p = logits.softmax(1)
    return logits, p


def _mean(vals):
    vals = [float(v) for v in vals]
    return sum(vals) / len(vals) if vals else float("nan")


def targeted_triplets(model: nn.Module, source: torch.Tensor, target: torch.Tensor, *,
                      transform: Optional[Transform] = None, saliency: bool = True,
                      methods: Optional[Sequence[str]] = None, k: Union[float, int] = 0.25) -> TripletReport:
    """Build and measure source / target / transformed triplets (OpenReview:d8VrVfNARSy §7, Fig. 5; A.4, Fig. 7).

    Args:
        model: the classifier (images in [0, 1]).
        source, target: ``(N, C, H, W)`` image batches in [0, 1] (pairs by index).
        transform: ``(source, target) -> transformed``; default :func:`nullspace_transform` (projection,
            unconstrained). Any callable works, e.g. a learnt or attack-based transform.
        saliency: also compute saliency maps (``methods``, default all of
            :data:`ns_plugin.applications.saliency.METHODS`) for the three images, each for the class the
            model predicts on it, and their similarity (transformed vs source and vs target).
        k: top-k fraction for the IoU of saliency maps.

    ``summary`` holds: ``match_source`` (fraction of transformed images predicted as their source),
    ``match_target``, mean confidences, ``mean_abs_conf_diff`` (|p_source(c_s) - p_transformed(c_s)|),
    ``max_logit_diff``, the mean l2 / mean-abs pixel distances transformed->target, transformed->source and
    source->target, ``closer_to_target`` (fraction of triplets where the transformed image is nearer the
    target than the source is), ``out_of_range`` (fraction of pixels outside [0, 1]) and ``value_range``,
    ``embedding_residual`` (max |W patch| of transformed - source, when the model has an exact nullspace),
    ``clipped`` (the same prediction figures after clamping to [0, 1]) and ``saliency``
    (``{method: {"vs_source": {...}, "vs_target": {...}}}``, Pearson / Spearman / top-k IoU).
    """
    from ..models import check_images

    check_images(source, model, what="source images")
    check_images(target, model, what="target images")
    if source.shape != target.shape:
        raise NSPluginError(f"source and target must have the same shape, got {tuple(source.shape)} and "
                            f"{tuple(target.shape)}; pair them by index")
    model.eval()
    transform = transform or nullspace_transform(model)
    with torch.no_grad():
        out = transform(source, target)
    if not isinstance(out, torch.Tensor) or out.shape != source.shape or not torch.isfinite(out).all():
        raise NSPluginError(f"the transform must return finite images of shape {tuple(source.shape)}, got "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    out = out.detach().float()
    clipped = out.clamp(0, 1)
    (ls, ps), (lt, pt), (lo, po), (lc, pc) = (_predict(model, t) for t in (source, target, out, clipped))
    cs, ct, co, cc = ls.argmax(1), lt.argmax(1), lo.argmax(1), lc.argmax(1)
    flat = lambda t: t.double().flatten(1)  # noqa: E731
    d_tt = (flat(out) - flat(target)).norm(dim=1)
    d_ts = (flat(out) - flat(source)).norm(dim=1)
    d_st = (flat(source) - flat(target)).norm(dim=1)
    dc_tt = (flat(clipped) - flat(target)).norm(dim=1)
    residual = None
    try:
        from ..nullspace.exact import exact_nullspace
        ns = getattr(transform, "nullspace", None) or exact_nullspace(model)
        residual = ns.embedding_residual((out.double() - source.double()))
    except NSPluginError:
        pass
    rows = []
    for i in range(source.shape[0]):
        rows.append({
            "pred_source": int(cs[i]), "conf_source": float(ps[i, cs[i]]),
            "pred_target": int(ct[i]), "conf_target": float(pt[i, ct[i]]),
            "pred_transformed": int(co[i]), "conf_transformed": float(po[i, co[i]]),
            "conf_transformed_source_class": float(po[i, cs[i]]),
            "pred_clipped": int(cc[i]), "conf_clipped_source_class": float(pc[i, cs[i]]),
            "l2_to_target": float(d_tt[i]), "l2_to_source": float(d_ts[i]), "l2_source_target": float(d_st[i]),
            "l2_clipped_to_target": float(dc_tt[i]),
            "min": float(out[i].min()), "max": float(out[i].max()),
        })
    n = len(rows)
    summary = {
        "n": n,
        "mode": getattr(transform, "mode", "custom"), "fit": getattr(transform, "fit", "custom"),
        "match_source": _mean(r["pred_transformed"] == r["pred_source"] for r in rows),
        "match_target": _mean(r["pred_transformed"] == r["pred_target"] for r in rows),
        "source_target_differ": _mean(r["pred_source"] != r["pred_target"] for r in rows),
        "conf_source": _mean(r["conf_source"] for r in rows),
        "conf_transformed": _mean(r["conf_transformed"] for r in rows),
        "mean_abs_conf_diff": _mean(abs(r["conf_source"] - r["conf_transformed_source_class"]) for r in rows),
        "max_logit_diff": float((lo - ls).abs().max()),
        "l2_to_target": _mean(d_tt), "l2_to_source": _mean(d_ts), "l2_source_target": _mean(d_st),
        "mean_abs_to_target": float((out - target).abs().mean()),
        "mean_abs_to_source": float((out - source).abs().mean()),
        "closer_to_target": _mean((d_tt < d_st).tolist()),
        "out_of_range": float(((out < 0) | (out > 1)).double().mean()),
        "value_range": [float(out.min()), float(out.max())],
        "embedding_residual": residual,
        "clipped": {
            "match_source": _mean(r["pred_clipped"] == r["pred_source"] for r in rows),
            "mean_abs_conf_diff": _mean(abs(r["conf_source"] - r["conf_clipped_source_class"]) for r in rows),
            "max_logit_diff": float((lc - ls).abs().max()),
            "l2_to_target": _mean(dc_tt),
        },
    }
    maps: Dict[str, Dict[str, torch.Tensor]] = {}
    if saliency:
        from .saliency import METHODS, compare_to, saliency_maps

        methods = tuple(methods or METHODS)
        maps = {"source": saliency_maps(model, source, cs, methods=methods),
                "target": saliency_maps(model, target, ct, methods=methods),
                "transformed": saliency_maps(model, out, co, methods=methods)}
        sims = compare_to(maps["transformed"], {"vs_source": maps["source"], "vs_target": maps["target"]}, k=k)
        summary["saliency"] = sims
        summary["saliency_closer_to_source"] = {
            m: bool(s["vs_source"]["pearson"] > s["vs_target"]["pearson"]) for m, s in sims.items()}
    return TripletReport(summary, rows, source.detach().cpu(), target.detach().cpu(), out.cpu(), maps)


def plot_triplets(report: TripletReport, path: Union[str, Path], *, methods: Optional[Sequence[str]] = None,
                  max_triplets: int = 4, dpi: int = 100) -> Path:
    """Draw the triplets (Fig. 5 / Fig. 7 style): for each triplet one row of images (source, target,
    transformed, titled with prediction and confidence; the transformed image is shown clamped to [0, 1])
    and one row per saliency method. Written atomically to ``path`` (format from the suffix)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .saliency import upsample

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "pdf", "svg", "jpg", "jpeg"):
        raise NSPluginError(f"unsupported figure format {fmt!r}; use .png, .pdf, .svg or .jpg")
    methods = list(methods if methods is not None else (report.maps.get("source", {}) or {}).keys())
    missing = [m for m in methods if m not in report.maps.get("source", {})]
    if missing:
        raise NSPluginError(f"the report has no {missing} maps; run targeted_triplets(saliency=True, methods=...)")
    n = min(max_triplets, report.source.shape[0])
    if n < 1:
        raise NSPluginError("the report has no triplets to plot")
    rows_per = 1 + len(methods)
    fig, axes = plt.subplots(n * rows_per, 3, figsize=(6, 2.1 * n * rows_per), squeeze=False)
    names = ("source", "target", "transformed")
    imgs = (report.source, report.target, report.transformed)
    for i in range(n):
        r = report.per_image[i]
        for j, (name, x) in enumerate(zip(names, imgs)):
            ax = axes[i * rows_per, j]
            ax.imshow(x[i].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_title(f"{name}: {r['pred_' + name]} ({r['conf_' + name]:.2f})", fontsize=8)
            for mi, m in enumerate(methods):
                mp = upsample(report.maps[name][m][i:i + 1], x.shape[-2:])[0]
                axm = axes[i * rows_per + 1 + mi, j]
                axm.imshow(x[i].clamp(0, 1).mean(0).numpy(), cmap="gray")
                axm.imshow(mp.numpy(), cmap="jet", alpha=0.5)
                axm.set_title(f"{m}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    from ..io import atomic_savefig
    try:
        atomic_savefig(fig, path, format=fmt, dpi=dpi)
    finally:
        plt.close(fig)
    return path
