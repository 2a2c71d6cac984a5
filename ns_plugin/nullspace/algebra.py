"""Algebra of the ε-approximate nullspace and noise transfer.

* :func:`scale_influence` -- influence (MSE probability, prediction match) of ``α·v`` for a range of α
  (arXiv:2403.10476, §5.6, Fig. 5(a)).
* :func:`convex_grid` -- influence of ``α1·v_i + α2·v_j`` on an α grid in [0, 1]^2, averaged over pairs of
  learnt noises (arXiv:2403.10476, §5.6, Fig. 5(b)); :func:`plot_convex_grid` draws it as a heatmap with the ε
  contour, :func:`plot_scale_influence` the α curve (matplotlib, Agg backend, atomic writes).
* :func:`learn_noises` -- m noises from different random inits (the set ``V`` of §5.6).
* :func:`transfer_noise` -- apply a noise learnt on one model to another with the same token shape and
  report its quality there (OpenReview:d8VrVfNARSy, §5.3, Fig. 3(c)).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import NSPluginError
from ._common import _generator, frozen
from .metrics import _eval_logits, _validate_noise, mse_prob, noise_quality
from .search import search_noise

__all__ = ["learn_noises", "scale_influence", "convex_grid", "plot_scale_influence", "plot_convex_grid",
           "transfer_noise"]

NoiseSet = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(noises: NoiseSet) -> List[torch.Tensor]:
    if isinstance(noises, torch.Tensor):
        if noises.dim() in (3, 4) and noises.shape[0] == 1:
            return [noises]
        return [n.unsqueeze(0) for n in noises]  # stacked (m, Np, D) or (m, C, H, W)
    out = list(noises)
    if not out or not all(isinstance(n, torch.Tensor) for n in out):
        raise NSPluginError("noises must be a non-empty list of tensors (or one stacked tensor)")
    return out


def learn_noises(model: nn.Module, data, m: int = 4, *, seed: int = 0, **search_kwargs) -> List[torch.Tensor]:
    """``m`` ε-approximate noises from different random inits (generators ``seed .. seed+m-1``), the set
    ``V = {v_i}`` of arXiv:2403.10476 §5.6 (m = 100 there).  ``search_kwargs`` go to :func:`search_noise`."""
    if not isinstance(m, int) or m < 1:
        raise NSPluginError(f"m must be a positive integer, got {m!r}")
    return [search_noise(model, data, generator=seed + i, **search_kwargs)[0] for i in range(m)]


def scale_influence(model: nn.Module, noises: NoiseSet, x: torch.Tensor,
                    alphas: Optional[Sequence[float]] = None, *, batch_size: int = 256) -> Dict[str, list]:
    """Mean influence of ``α·v`` over the noises, for each α (arXiv:2403.10476 Fig. 5(a)).

    Returns ``{"alphas", "mse_prob", "pred_match"}`` (lists aligned with ``alphas``; MSE probability and
    % of unchanged predictions averaged over the noises).  Default α: 0, 0.1, ..., 2."""
    from ..models import strip_parallel
    from ..models import check_images
    net = strip_parallel(model)
    check_images(x, net)
    vs = [_validate_noise(net, v, x) for v in _as_list(noises)]
    alphas = [round(0.1 * i, 10) for i in range(21)] if alphas is None else [float(a) for a in alphas]
    if not alphas:
        raise NSPluginError("alphas is empty; pass at least one scaling factor")
    mse = torch.zeros(len(alphas))
    match = torch.zeros(len(alphas))
    with frozen(net):
        for v in vs:
            clean, noisy = _eval_logits(net, x, [a * v for a in alphas], batch_size)
            for k, z in enumerate(noisy):
                mse[k] += float(mse_prob(z, clean))
                match[k] += 100.0 * float((z.argmax(1) == clean.argmax(1)).float().mean())
    return dict(alphas=alphas, mse_prob=(mse / len(vs)).tolist(), pred_match=(match / len(vs)).tolist())


def convex_grid(model: nn.Module, noises: NoiseSet, x: torch.Tensor, *, pairs: int = 10, step: float = 0.1,
                generator=None, batch_size: int = 256) -> Dict[str, list]:
    """MSE probability of ``α1·v_i + α2·v_j`` for α1, α2 in ``0, step, ..., 1``, averaged over ``pairs``
    random pairs ``(i, j)``, i != j, of the noises (arXiv:2403.10476 Fig. 5(b); step 0.1, 10 pairs there).

    Returns ``{"alphas", "grid", "pairs"}`` where ``grid[a][b]`` is the mean MSE probability at
    ``α1 = alphas[a]``, ``α2 = alphas[b]``."""
    from ..models import strip_parallel
    from ..models import check_images
    net = strip_parallel(model)
    check_images(x, net)
    vs = [_validate_noise(net, v, x) for v in _as_list(noises)]
    if len(vs) < 2:
        raise NSPluginError(f"convex_grid needs at least 2 noises, got {len(vs)}; learn more with learn_noises")
    if not (isinstance(pairs, int) and pairs >= 1):
        raise NSPluginError(f"pairs must be a positive integer, got {pairs!r}")
    if not (0 < step <= 1):
        raise NSPluginError(f"step must be in (0, 1], got {step!r}")
    n = int(round(1 / step))
    alphas = [round(i * step, 10) for i in range(n + 1)]
    g = _generator(generator)
    chosen = []
    for _ in range(pairs):
        i, j = torch.randperm(len(vs), generator=g, device=g.device if g is not None else "cpu")[:2].tolist()
        chosen.append((i, j))
    grid = torch.zeros(len(alphas), len(alphas))
    with frozen(net):
        for i, j in chosen:
            combos = [a1 * vs[i] + a2 * vs[j] for a1 in alphas for a2 in alphas]
            clean, noisy = _eval_logits(net, x, combos, batch_size)
            for k, z in enumerate(noisy):
                grid[k // len(alphas), k % len(alphas)] += float(mse_prob(z, clean))
    return dict(alphas=alphas, grid=(grid / len(chosen)).tolist(), pairs=chosen)


def _atomic_fig(fig, path: Union[str, os.PathLike]) -> Path:
    from ..io import atomic_savefig
    return atomic_savefig(fig, path, dpi=120, bbox_inches="tight")


def plot_scale_influence(result: Dict[str, list], path: Union[str, os.PathLike], *, eps: Optional[float] = None
                         ) -> Path:
    """Plot :func:`scale_influence` (MSE probability vs α, with the ε line and the ``α·ε`` reference of
    §5.6) to ``path`` (PNG), written atomically."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    a = result["alphas"]
    ax.plot(a, result["mse_prob"], "o-", label="MSE probability of α·v")
    if eps is not None:
        ax.axhline(eps, color="gray", ls="--", lw=1, label=f"ε = {eps:g}")
        ax.plot(a, [eps * x for x in a], color="gray", ls=":", lw=1, label="α·ε")
    ax.set_xlabel("α")
    ax.set_ylabel("MSE probability")
    ax.set_title("Influence of scaled ε-noise (Fig. 5a)")
    ax.legend(fontsize=7)
    try:
        return _atomic_fig(fig, path)
    finally:
        plt.close(fig)


def plot_convex_grid(result: Dict[str, list], path: Union[str, os.PathLike], *, eps: Optional[float] = None
                     ) -> Path:
    """Heatmap of :func:`convex_grid` (α1 rows, α2 columns) with the ε contour and the α1 + α2 = 1 line
    (arXiv:2403.10476 Fig. 5(b)), written atomically to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    a = np.asarray(result["alphas"])
    grid = np.asarray(result["grid"])
    fig, ax = plt.subplots(figsize=(4.8, 4))
    h = (a[1] - a[0]) / 2 if len(a) > 1 else 0.5
    im = ax.imshow(grid, origin="lower", extent=(a[0] - h, a[-1] + h, a[0] - h, a[-1] + h), cmap="viridis",
                   aspect="auto")
    fig.colorbar(im, ax=ax, label="MSE probability")
    if eps is not None and grid.min() < eps < grid.max():
        ax.contour(a, a, grid, levels=[eps], colors="white", linewidths=1.2)
    ax.plot([0, 1], [1, 0], "w--", lw=1)
    ax.set_xlabel("α2")
    ax.set_ylabel("α1")
    ax.set_title("Convex combinations of ε-noises (Fig. 5b)")
    try:
        return _atomic_fig(fig, path)
    finally:
        plt.close(fig)


def transfer_noise(noise: torch.Tensor, target: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                   generator=None, batch_size: int = 256) -> Dict[str, float]:
    """Quality (:func:`noise_quality`) of a noise learnt on one model when applied to ``target`` (OpenReview:d8VrVfNARSy
    §5.3, Fig. 3(c)).  Encoder-level noise needs the same ``(N_patches, D)`` token shape, input-level noise
    the same image shape; otherwise a one-line :class:`NSPluginError` names both shapes."""
    from ..anatomy import token_shape
    from ..models import strip_parallel
    if isinstance(noise, torch.Tensor) and noise.dim() == 3:
        want = (1, *token_shape(strip_parallel(target)))
        if tuple(noise.shape) != want:
            raise NSPluginError(f"cannot transfer the noise: its token shape {tuple(noise.shape)} differs from the "
                                f"target model's {want}; transfer needs models with the same (N_patches, D)")
    return noise_quality(target, noise, x, y, generator=generator, batch_size=batch_size)
