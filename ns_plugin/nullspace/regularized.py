"""The λ-regularised noise objective of Eq. 4 ("Approximate Nullspace Augmented Finetuning for Robust Vision
Transformers"), learnt by plain gradient descent, and the sampling-limit (``lim``) sweep of "Nullspace of Vision
Transformers and what does it tell us?", appendix A.1 (Fig. 2).
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import NSPluginError
from ._common import NoiseRecord, _Batches, _Forward, _diverged, _positive, _prepare, frozen, uniform_noise
from .metrics import mse_prob, noise_quality

__all__ = ["learn_noise_regularized", "lim_sweep"]


def learn_noise_regularized(model: nn.Module, data, *, lam: float = 0.0, lim: float = 1.0, lr: float = 0.01,
                            steps: int = 500, p: float = 2.0, milestones: Sequence[float] = (0.3, 0.6, 0.8),
                            level: str = "encoder", batch_size: int = 128, eps: float = 0.03, generator=None,
                            progress: bool = False) -> Tuple[torch.Tensor, NoiseRecord]:
    """Learn a noise with the λ-regularised objective of arXiv:2403.10476 Eq. 4 by plain gradient descent:
    ``L(v) = mean_i ||z'_i - z_i||_p - lam * log ||v||`` (``lam = 0`` gives OpenReview:d8VrVfNARSy's Eq. 6 / A.1 loss,
    the ℓ_p distance of the logits, not squared).

    As in OpenReview:d8VrVfNARSy, appendix A.1: ``v ~ U(-lim, lim)``, ``steps`` gradient steps of size ``lr`` (0.01 there),
    the step size divided by 10 at the given fractions of the run ([150, 300, 400] of 500 there).  No early
    stopping; ``record.reached`` tells whether the final noise is inside the ε region on the last batch
    (``eps`` is only used for that flag).  ``level="input"`` learns a pixel-level noise for any model.
    Parameters are frozen and the model's modes restored as in :func:`search_noise`.
    """
    from tqdm.auto import tqdm
    from ..anatomy import token_shape

    for name, val in (("lim", lim), ("lr", lr), ("p", p), ("eps", eps)):
        _positive(name, val)
    _positive("steps", steps, integer=True)
    _positive("batch_size", batch_size, integer=True)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise NSPluginError(f"lam must be a finite number >= 0, got {lam!r}")
    if level not in ("encoder", "input"):
        raise NSPluginError(f"level must be 'encoder' or 'input', got {level!r}")
    g, net, dev = _prepare(model, generator)
    t0 = time.perf_counter()
    with frozen(model):
        batches = _Batches(data, net, batch_size, g)
        fwd = _Forward(net, level, "fast")
        x = next(batches)
        shape = (1, *token_shape(net)) if level == "encoder" else (1, *x.shape[1:])
        v = uniform_noise(shape, lim, generator=g, device=dev).requires_grad_(True)
        init_norm = float(v.detach().norm())
        decay_at = {int(round(f * steps)) for f in milestones}
        step_size = float(lr)
        history, losses, d = [], [], float("nan")
        for t in tqdm(range(steps), desc="regularised noise", disable=not progress, leave=False):
            if t > 0:
                x = next(batches)
            if t in decay_at:
                step_size *= 0.1
            clean, noisy = fwd.pair(x, v)
            dist = (noisy.float() - clean.float()).abs().pow(p).sum(-1).pow(1.0 / p).mean()
            loss = dist - lam * torch.log(v.norm()) if lam > 0 else dist
            if not torch.isfinite(loss):
                raise _diverged(t, lr, lim)
            (grad,) = torch.autograd.grad(loss, [v])
            with torch.no_grad():
                v -= step_size * grad
            if not bool(torch.isfinite(v).all()):
                raise _diverged(t + 1, lr, lim)
            d = float(mse_prob(noisy.detach(), clean))
            history.append(d)
            losses.append(float(loss.detach()))
        with torch.no_grad():
            clean, noisy = fwd.pair(next(batches), v)
            d = float(mse_prob(noisy, clean))
        history.append(d)
        noise = v.detach()
    rec = NoiseRecord(steps=int(steps), mse_prob=d, norm=float(noise.norm()), reached=d < eps,
                      seconds=time.perf_counter() - t0, init="uniform", eps=float(eps), lim=float(lim), lr=float(lr),
                      mode="gradient-descent", level=level, checks=len(history), init_norm=init_norm,
                      objective=f"eq4(lam={lam}, p={p})", history=history, losses=losses)
    return noise, rec


def lim_sweep(model: nn.Module, train_data, x_eval: torch.Tensor, y_eval: Optional[torch.Tensor] = None, *,
              lims: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0), lam: float = 0.0,
              steps: int = 500, lr: float = 0.01, level: str = "encoder", batch_size: int = 128, seed: int = 0,
              progress: bool = False) -> List[Dict[str, float]]:
    """The sampling-limit sweep of OpenReview:d8VrVfNARSy, §4 and appendix A.1 (Fig. 2): for each ``lim``, learn a noise
    with :func:`learn_noise_regularized` from ``U(-lim, lim)`` and report its :func:`noise_quality` on the
    held-out images (prediction match and MSE probability, learnt vs permuted).  One row per ``lim``
    with ``lim``, ``steps``, ``train_mse_prob`` and the quality metrics."""
    if not lims:
        raise NSPluginError("lims is empty; pass at least one sampling limit")
    rows = []
    for i, lim in enumerate(lims):
        v, rec = learn_noise_regularized(model, train_data, lam=lam, lim=float(lim), lr=lr, steps=steps,
                                         level=level, batch_size=batch_size, generator=seed + i, progress=progress)
        q = noise_quality(model, v, x_eval, y_eval, generator=seed + i)
        rows.append(dict(lim=float(lim), steps=rec.steps, train_mse_prob=rec.mse_prob, **q))
    return rows
