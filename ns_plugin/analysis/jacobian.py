"""Local structure of a ViT representation (arXiv:2401.15568 "Intriguing Equivalence Structures of the Embedding
Space of Vision Transformers", §"Proposed Framework" and "Experiments").

* :func:`representation` turns a classifier (``Sequential(Normalize, timm ViT)``) into ``f: images -> R^n``
  (the cls token after the final norm, the pre-logits, the logits, or any callable).
* :func:`jacobian` computes ``df/dx`` at one image with ``torch.func.jacrev``, chunked over the output
  dimensions, after checking that the matrix fits in ``max_bytes`` (else :class:`NSPluginError` with the
  number of bytes it would need).
* :func:`local_spaces` takes its reduced SVD (Eq. 5): the normal space (right singular vectors with
  non-zero singular values), the weakest normal directions, and random directions in the local null space
  (the orthogonal complement, of dimension ``m - rank``).
* :func:`directional_lipschitz` estimates the local directional Lipschitz constant of Eq. 7,
  ``max_{alpha != beta} ||f(x + beta u) - f(x + alpha u)|| / |beta - alpha|`` over a grid of
  ``|alpha|, |beta| <= eps``, for many directions at once; :func:`lipschitz_profile` does it along the top
  singular, random and null directions (Figs 3-4).
* :func:`embedding_matching` is the embedding-matching procedure of Eq. 3-4 (gradient descent on
  ``1/2 ||f(x) - f(x_tg)||^2``) with the cosine similarity and pixel change per step (Fig. 5), and
  :func:`interpolation_curve` the cosine similarities along a straight path between two inputs (Fig. 6).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NSPluginError

__all__ = ["representation", "jacobian_nbytes", "jacobian", "local_spaces", "directional_lipschitz",
           "lipschitz_profile", "embedding_matching", "interpolation_curve"]

Rep = Callable[[torch.Tensor], torch.Tensor]
KINDS = ("cls", "features", "pre_logits", "logits")  # ns_plugin.anatomy.REPRESENTATIONS


def representation(model: nn.Module, kind: str = "pre_logits", *, dtype: Optional[torch.dtype] = torch.float64
                   ) -> Rep:
    """:func:`ns_plugin.anatomy.representation` run in float64 by default (so that tiny differences along
    null directions are not float32 rounding). ``kind``: ``cls``, ``features``, ``pre_logits`` (the
    classifier's input; the paper uses the ImageBind/CLIP embedding, the analogue here) or ``logits``."""
    from ..anatomy import representation as _representation
    return _representation(model, kind, dtype=dtype)


def _as_image(x: torch.Tensor, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[0] != 1):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise NSPluginError(f"{what} must be one image (C, H, W) or (1, C, H, W), got {shape}")
    if not torch.isfinite(x).all():
        raise NSPluginError(f"{what} contains NaN or inf")
    return x.reshape(1, *x.shape[-3:])


def jacobian_nbytes(n_out: int, n_in: int, dtype: torch.dtype = torch.float64) -> int:
    """Bytes of an ``n_out x n_in`` Jacobian in ``dtype``."""
    return int(n_out) * int(n_in) * torch.empty(0, dtype=dtype).element_size()


def jacobian(f: Rep, x: torch.Tensor, *, chunk_size: Optional[int] = 16, max_bytes: int = 1 << 30) -> torch.Tensor:
    """Jacobian ``df/dx`` of a representation at one image (arXiv:2401.15568 Eq. 4-5), shape ``(n, C*H*W)``.

    Computed with ``torch.func.jacrev`` in chunks of ``chunk_size`` output dimensions (each chunk is one
    vmapped backward pass, so peak memory is about ``chunk_size`` times one backward pass plus the matrix
    itself). Before computing, the size of the matrix is checked: if ``n * C*H*W * itemsize > max_bytes``
    an :class:`NSPluginError` says how many bytes it would need (raise ``max_bytes`` or use a smaller
    representation / input). ``chunk_size=None`` does all outputs in one pass.
    """
    from torch.func import jacrev

    x = _as_image(x)
    if chunk_size is not None and chunk_size < 1:
        raise NSPluginError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    with torch.no_grad():
        y0 = f(x)
    if y0.dim() != 2 or y0.shape[0] != 1:
        raise NSPluginError(f"the representation must map (1, C, H, W) to (1, n), got {tuple(y0.shape)}")
    n, m = int(y0.shape[1]), x[0].numel()
    need = jacobian_nbytes(n, m, y0.dtype)
    if need > max_bytes:
        raise NSPluginError(f"the Jacobian would be {n} x {m} {str(y0.dtype).replace('torch.', '')} = "
                            f"{need:,} bytes ({need / 2**30:.2f} GiB), above max_bytes={max_bytes:,}; raise "
                            f"max_bytes or use a smaller input/representation")
    shape = x.shape
    x_in = x.reshape(-1).to(y0.dtype).detach()

    def g(flat: torch.Tensor) -> torch.Tensor:
        return f(flat.reshape(shape))[0]

    return jacrev(g, chunk_size=chunk_size)(x_in).detach()


def local_spaces(J: torch.Tensor, *, rtol: Optional[float] = None, n_null: int = 0, n_weak: int = 0,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Reduced SVD ``J = U S V^T`` and the local normal / null spaces (arXiv:2401.15568 Eq. 5).

    Args:
        J: ``(n, m)`` Jacobian with ``m > n`` typically.
        rtol: singular values ``<= rtol * s_max`` count as zero (default ``max(n, m) * eps(J.dtype)``).
        n_null: number of random unit directions to draw in the null space (the complement of the
            row space of ``J``, dimension ``m - rank``): Gaussian vectors with their normal part removed.
        n_weak: number of normal directions with the smallest non-zero singular values to return.

    Returns ``{"U", "S", "Vh", "rank", "null_dim", "normal" (rank x m), "null" (n_null x m),
    "weak" (n_weak x m), "weak_values"}``.
    """
    if J.dim() != 2:
        raise NSPluginError(f"J must be a 2-D (n, m) matrix, got shape {tuple(J.shape)}")
    u, s, vh = torch.linalg.svd(J, full_matrices=False)
    rtol = max(J.shape) * torch.finfo(J.dtype).eps if rtol is None else rtol
    rank = int((s > rtol * (s[0] if s.numel() else 0)).sum())
    normal = vh[:rank]
    null_dim = J.shape[1] - rank
    if n_null > 0 and null_dim == 0:
        raise NSPluginError("the Jacobian has full column rank: the local null space is {0}")
    r = torch.randn(n_null, J.shape[1], generator=generator, dtype=J.dtype).to(J.device)
    r = r - (r @ normal.T) @ normal
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-300)
    k = min(n_weak, rank)
    return {"U": u, "S": s, "Vh": vh, "rank": torch.tensor(rank), "null_dim": torch.tensor(null_dim),
            "normal": normal, "null": r, "weak": vh[rank - k:rank], "weak_values": s[rank - k:rank]}


@torch.no_grad()
def directional_lipschitz(f: Rep, x: torch.Tensor, directions: torch.Tensor, *, eps: float = 1e-2,
                          n_points: int = 5, batch_size: int = 64) -> torch.Tensor:
    """Local directional Lipschitz constants (arXiv:2401.15568 Eq. 7), one per direction.

    ``L(u) = max_{alpha != beta} ||f(x + beta u) - f(x + alpha u)|| / |beta - alpha|`` over the grid
    ``alpha, beta in linspace(-eps, eps, n_points)``; ``u`` is normalised to unit length first.

    Args:
        f: representation (see :func:`representation`).
        x: one image ``(C, H, W)`` or ``(1, C, H, W)``.
        directions: ``(k, C*H*W)`` or ``(k, C, H, W)``.
        eps: ``epsilon_LD``, the half-width of the interval (pixels are in [0, 1]).
        n_points: grid size (>= 2).
        batch_size: forward passes per batch.
    """
    x = _as_image(x)
    if n_points < 2 or eps <= 0:
        raise NSPluginError(f"need n_points >= 2 and eps > 0, got n_points={n_points}, eps={eps}")
    d = directions.reshape(directions.shape[0], -1)
    if d.shape[1] != x[0].numel():
        raise NSPluginError(f"directions have {d.shape[1]} entries, the image has {x[0].numel()}")
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    t = torch.linspace(-eps, eps, n_points, dtype=torch.float64)
    pts = (x.reshape(1, 1, -1).double() + t[None, :, None] * d.double()[:, None, :]).reshape(-1, *x.shape[1:])
    outs = torch.cat([f(pts[i:i + batch_size]).double() for i in range(0, len(pts), batch_size)])
    outs = outs.reshape(d.shape[0], n_points, -1)
    diff = torch.cdist(outs, outs)  # (k, P, P)
    dt = (t[:, None] - t[None, :]).abs()
    dt = torch.where(dt > 0, dt, torch.full_like(dt, math.inf))
    return (diff / dt[None]).flatten(1).max(1).values


def lipschitz_profile(f: Rep, x: torch.Tensor, *, J: Optional[torch.Tensor] = None, n_top: int = 16,
                      n_random: int = 16, n_null: int = 16, eps: float = 1e-2, n_points: int = 5,
                      seed: int = 0, chunk_size: Optional[int] = 16, max_bytes: int = 1 << 30) -> Dict:
    """Singular values of the Jacobian and Eq. 7 estimates along the top ``n_top`` right singular vectors,
    ``n_random`` Gaussian directions and ``n_null`` random null-space directions (arXiv:2401.15568 Figs 3-4).

    Returns a dict of lists: ``singular_values``, ``rank``, ``null_dim``, ``L_singular`` (aligned with the
    first ``n_top`` singular values, which they should match when the linear model of Eq. 5 holds),
    ``L_random``, ``L_null``.
    """
    g = torch.Generator().manual_seed(seed)
    J = jacobian(f, x, chunk_size=chunk_size, max_bytes=max_bytes) if J is None else J
    sp = local_spaces(J, n_null=n_null, generator=g)
    top = sp["Vh"][:min(n_top, int(sp["rank"]))]
    rnd = torch.randn(n_random, J.shape[1], generator=g, dtype=J.dtype)
    res = {"singular_values": sp["S"].tolist(), "rank": int(sp["rank"]), "null_dim": int(sp["null_dim"])}
    for name, dirs in (("L_singular", top), ("L_random", rnd), ("L_null", sp["null"])):
        res[name] = directional_lipschitz(f, x, dirs, eps=eps, n_points=n_points).tolist() if len(dirs) else []
    return res


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def embedding_matching(f: Rep, x0: torch.Tensor, x_target: Union[torch.Tensor, None] = None, *,
                       target_embedding: Optional[torch.Tensor] = None, steps: int = 500, lr: float = 0.01,
                       optimizer: str = "sgd", clamp: bool = True, classifier: Optional[nn.Module] = None,
                       record_every: int = 1, progress: bool = False) -> Dict:
    """Embedding matching procedure (arXiv:2401.15568 Eq. 3-4): gradient descent on
    ``L(x) = 1/2 ||f(x) - f(x_tg)||^2`` starting from ``x0``.

    Args:
        f: representation (see :func:`representation`).
        x0: starting image ``(C, H, W)`` / ``(1, C, H, W)`` in [0, 1].
        x_target: image whose embedding is matched (or give ``target_embedding`` directly).
        steps, lr: number of steps and learning rate (arXiv:2401.15568 reports 1e-3 ... 9e-2 all converge).
        optimizer: ``"sgd"`` (plain gradient descent, as in the paper) or ``"adam"``.
        clamp: keep the image in [0, 1] after each step.
        classifier: optional model whose predicted class is recorded per step (with ``x`` in [0, 1]).
        record_every: record the curves every k steps (the last step is always recorded).

    Returns ``{"x": final image (1, C, H, W), "step", "loss", "cosine" (to the target embedding),
    "cosine_start" (to f(x0)), "pixel_mean_abs" and "pixel_linf" (change from x0), "pred" (if
    classifier)}``; Fig. 5 plots loss and cosine against step.
    """
    from tqdm.auto import tqdm
    from ..anatomy import match_embedding

    x0 = _as_image(x0, "x0")
    if (x_target is None) == (target_embedding is None):
        raise NSPluginError("give exactly one of x_target or target_embedding")
    if steps < 1 or lr <= 0:
        raise NSPluginError(f"need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    with torch.no_grad():
        tgt = f(_as_image(x_target, "x_target")) if x_target is not None else target_embedding.reshape(1, -1)
        start = f(x0)
    if tgt.shape != start.shape:
        raise NSPluginError(f"target embedding has shape {tuple(tgt.shape)}, f(x0) has {tuple(start.shape)}")
    tgt, start = tgt.detach(), start.detach()
    if optimizer not in ("sgd", "adam"):
        raise NSPluginError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    hist = {k: [] for k in ("step", "loss", "cosine", "cosine_start", "pixel_mean_abs", "pixel_linf", "pred")}
    bar = tqdm(total=steps, desc="embedding matching", disable=not progress, leave=False)

    def record(step: int, x: torch.Tensor, emb: torch.Tensor, loss: torch.Tensor) -> bool:
        bar.update(1 if step else 0)
        if step % record_every and step != steps:
            return False
        d = (x - x0.to(x.dtype))
        hist["step"].append(step)
        hist["loss"].append(float(loss.sum()))
        hist["cosine"].append(_cos(emb, tgt))
        hist["cosine_start"].append(_cos(emb, start))
        hist["pixel_mean_abs"].append(float(d.abs().mean()))
        hist["pixel_linf"].append(float(d.abs().max()))
        if classifier is not None:
            with torch.no_grad():
                p = next(classifier.parameters())
                hist["pred"].append(int(classifier(x.to(p.dtype)).argmax(1)))
        return False

    try:
        x, _ = match_embedding(f, x0.detach().to(start.dtype), tgt, steps=steps, lr=lr, optimizer=optimizer,
                               clamp=clamp, callback=record)
    finally:
        bar.close()
    if classifier is None:
        del hist["pred"]
    hist["x"] = x
    return hist


@torch.no_grad()
def interpolation_curve(f: Rep, a: torch.Tensor, b: torch.Tensor, *, n: int = 21) -> Dict[str, list]:
    """Embeddings along the straight path ``x(t) = (1 - t) a + t b`` (arXiv:2401.15568 Fig. 6): cosine similarity of
    ``f(x(t))`` with ``f(a)`` and with ``f(b)`` for ``t`` in ``linspace(0, 1, n)``."""
    a, b = _as_image(a, "a"), _as_image(b, "b")
    if a.shape != b.shape:
        raise NSPluginError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if n < 2:
        raise NSPluginError(f"n must be >= 2, got {n}")
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    xs = (1 - t)[:, None, None, None] * a.double() + t[:, None, None, None] * b.double()
    e = f(xs).double()
    return {"t": t.tolist(), "cosine_to_a": F.cosine_similarity(e, e[:1]).tolist(),
            "cosine_to_b": F.cosine_similarity(e, e[-1:]).tolist(),
            "distance_to_a": (e - e[:1]).norm(dim=1).tolist(), "distance_to_b": (e - e[-1:]).norm(dim=1).tolist()}
