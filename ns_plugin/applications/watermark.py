"""Output-preserving watermarking with the exact patch-embedding nullspace (OpenReview:d8VrVfNARSy §6, Eq. 7 and A.2;
arXiv:2403.10476 appendix E).

For every patch ``j`` of an image ``x`` and the same patch of a watermark image ``w``, Eq. 7 of OpenReview:d8VrVfNARSy
chooses nullspace coefficients ``λ`` (``c`` below) by

    min_c || Δx_j - B^T c ||_p    subject to    0 <= x_j + B^T c <= 1,      Δx_j = w_j - x_j,

where the rows of ``B`` (``nullity x c·rh·rw``, orthonormal) span the nullspace of the patch embedding in
*pixel* space (:func:`ns_plugin.nullspace.exact.exact_nullspace` folds the model's normaliser into the map).
The watermarked patch is ``x_j + B^T c``: its patch embedding -- hence the network output -- equals the
original's, while it moves as close to the watermark as the nullspace and the [0, 1] box allow. The
objective is the plain (not squared) ``l_p`` norm of the remaining difference, as written in Eq. 7.

Two solvers of the *same* problem are provided:

* ``solver="slsqp"``: the paper's reference (A.2): ``scipy.optimize.minimize(method="SLSQP")`` on ``c``
  for each patch, ``maxiter=5000`` by default, started at ``c = 0`` (feasible). We give SLSQP the analytic
  gradient of the objective and the constraint Jacobians, which only makes the baseline faster than an
  "out of the box" call with finite differences.
* ``solver="exact"`` (default): the problem written on the watermarked patch ``u = x_j + B^T c`` is
  ``min ||u - w_j||_p`` over ``{u : A u = A x_j} ∩ [0, 1]^n`` (``A``: orthonormal basis of the row space of
  the patch map, the orthogonal complement of the nullspace).

  - ``p = 2`` is the Euclidean projection of ``w_j`` onto that polyhedron. We solve its Lagrange dual
    ``max_y θ(y)``, ``u(y) = clip(w_j + A^T y, 0, 1)``, ``∇θ = A x_j - A u(y)``, with a regularised
    semismooth Newton method and Armijo line search, batched over all patches of all images (one
    ``r x r`` linear solve per patch and iteration, ``r`` = rank of the patch map). It stops when the
    equality residual ``max |A u - A x_j|`` is below ``tol`` (default 1e-10); the dual value then certifies
    the optimum (the reported duality gap).
  - ``p = 1`` is a linear program, ``min 1^T(s⁺ + s⁻)`` s.t. ``u - s⁺ + s⁻ = w_j``, ``A u = A x_j``,
    ``0 <= u <= 1``, ``s^± >= 0``, solved exactly by HiGHS (``scipy.optimize.linprog``) on block-diagonal
    patch by patch.

  Both finish by mapping back to coefficients ``c = B (u - x_j)`` and forming ``x_j + B^T c``, so the
  perturbation lies in the nullspace to float64 round-off whatever the solver's tolerance; pixels are then
  checked against [0, 1] (violations of round-off size are clamped; a larger one -- only possible if a solver
  did not converge -- is removed by shrinking ``c`` towards 0, which keeps the patch exactly in the nullspace).

``benchmarks/watermark_speed.py`` runs both solvers on the same patches and prints the time ratio and the
objectives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import NSPluginError
from ..io import atomic_savefig
from .watermark_solvers import SOLVERS, row_space, solve_patches  # noqa: F401  (public names, re-exported)



# ---------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------
@dataclass
class WatermarkResult:
    """Output of :func:`watermark_images`.

    ``images``: watermarked images ``(N, C, H, W)`` float32 in [0, 1]; ``noise``: ``images - originals``
    (float64, in the nullspace patch by patch); ``coefficients``: ``(N, P, nullity)``; ``objective``:
    ``(N, P)`` Eq. 7 values; ``info``: solver details (seconds, residuals, iterations).
    """
    images: torch.Tensor
    noise: torch.Tensor
    coefficients: torch.Tensor
    objective: torch.Tensor
    p: int
    solver: str
    info: Dict[str, object] = field(default_factory=dict)


def _nullspace_of(model_or_ns):
    from ..nullspace.exact import PatchNullspace, exact_nullspace
    if isinstance(model_or_ns, PatchNullspace):
        return model_or_ns
    if not isinstance(model_or_ns, nn.Module):
        raise NSPluginError(f"expected a model or a PatchNullspace, got {type(model_or_ns).__name__}")
    return exact_nullspace(model_or_ns)


def watermark_images(model, images: torch.Tensor, watermark: torch.Tensor, *, p: int = 1, solver: str = "exact",
                     maxiter: int = 5000, tol: float = 1e-10, progress: bool = False) -> WatermarkResult:
    """Watermark a batch of images with Eq. 7 of OpenReview:d8VrVfNARSy (§6, A.2), keeping the patch embedding unchanged.

    Args:
        model: the classifier (``Sequential(Normalize, ViT)``; any model with a non-overlapping patch
            projection) or a precomputed :class:`~ns_plugin.nullspace.exact.PatchNullspace` (pixel space).
        images: ``(N, C, H, W)`` in [0, 1], the size the model expects.
        watermark: ``(C, H, W)``, ``(1, C, H, W)`` (one watermark for all) or ``(N, C, H, W)``, same size as
            the images (use :func:`load_watermark` / :func:`fit_watermark` to resize a file).
        p: the norm of Eq. 7 (the paper prefers p = 1, the default here too).
        solver: ``"exact"`` (default) or ``"slsqp"`` (the paper's reference, slow).

    Returns:
        :class:`WatermarkResult`.
    """
    from ..models import check_images

    ns = _nullspace_of(model)
    if ns.nullity == 0:
        raise NSPluginError("the model's patch embedding has no exact nullspace (nullity 0): nothing can be "
                            "watermarked without changing the output")
    check_images(images, model if isinstance(model, nn.Module) else None, what="images")
    wm = watermark.unsqueeze(0) if isinstance(watermark, torch.Tensor) and watermark.dim() == 3 else watermark
    if not isinstance(wm, torch.Tensor) or wm.dim() != 4:
        raise NSPluginError("watermark must be a (C, H, W) or (N, C, H, W) tensor")
    if tuple(wm.shape[1:]) != tuple(images.shape[1:]) or wm.shape[0] not in (1, images.shape[0]):
        raise NSPluginError(f"watermark has shape {tuple(wm.shape)} but the images are {tuple(images.shape)}; "
                            f"resize it with ns_plugin.applications.watermark.fit_watermark (the CLI resizes)")
    if not torch.isfinite(wm).all():
        raise NSPluginError("watermark contains NaN or inf values")
    wm = wm.expand_as(images)
    size = tuple(images.shape[-2:])
    X = ns.to_patches(images.detach().cpu().to(torch.float64))
    Wp = ns.to_patches(wm.detach().cpu().to(torch.float64))
    n, P, d = X.shape
    sol = solve_patches(X.reshape(-1, d), Wp.reshape(-1, d), ns.basis, p=p, solver=solver, maxiter=maxiter,
                        tol=tol, progress=progress)
    out = ns.from_patches(sol.pop("patches").reshape(n, P, d), size)
    coeffs = sol.pop("coefficients").reshape(n, P, -1)
    obj = sol.pop("objective").reshape(n, P)
    sol.pop("raw_objective", None)
    sol.pop("raw_patches", None)
    noise = out - images.detach().cpu().to(torch.float64)
    sol["embedding_residual"] = ns.embedding_residual(noise)
    return WatermarkResult(images=out.to(images.dtype).to(images.device), noise=noise, coefficients=coeffs,
                           objective=obj, p=p, solver=solver, info=sol)


# ---------------------------------------------------------------------------------------------------------
# evaluation (A.2) and the figure (Fig. 4 of OpenReview:d8VrVfNARSy / Fig. 6 of arXiv:2403.10476)
# ---------------------------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (peak 1)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels, as saving to PNG does."""
    return (x.double() * 255).round() / 255


@torch.no_grad()
def evaluate_watermark(model: nn.Module, images: torch.Tensor, watermarked: torch.Tensor,
                       watermark: torch.Tensor) -> Dict[str, float]:
    """The A.2 figures of OpenReview:d8VrVfNARSy on a batch: prediction match (% of watermarked images given the source
    image's class), mean |Δ p(source class)| (in %), PSNR of the watermarked images against the watermark and
    against the originals; the same after 8-bit quantisation (saving as PNG), which leaves the nullspace; and
    the model's float32 behaviour (the float64 numbers show the exact invariance)."""
    model = model.eval()
    dev = next(model.parameters()).device
    wm = watermark.unsqueeze(0) if watermark.dim() == 3 else watermark
    wm = wm.expand_as(images)

    def probs(m, x, dtype):
        return m(x.to(dev, dtype)).softmax(1).double().cpu()

    out: Dict[str, float] = {"n_images": int(len(images))}
    import copy
    m64 = copy.deepcopy(model).double()
    for tag, m, dtype in (("", model, torch.float32), ("_float64", m64, torch.float64)):
        p0 = probs(m, images, dtype)
        src = p0.argmax(1)
        for suffix, xw in (("", watermarked), ("_uint8", quantize(watermarked))):
            if tag and suffix:
                continue
            p1 = probs(m, xw, dtype)
            key = tag + suffix
            out["pred_match" + key] = 100.0 * float((p1.argmax(1) == src).double().mean())
            out["mean_abs_dprob" + key] = 100.0 * float((p1.gather(1, src[:, None]) - p0.gather(1, src[:, None]))
                                                        .abs().mean())
            out["max_abs_dprob" + key] = 100.0 * float((p1 - p0).abs().max())
    out["psnr_vs_watermark"] = float(psnr(watermarked, wm).mean())
    out["psnr_original_vs_watermark"] = float(psnr(images, wm).mean())
    out["psnr_vs_original"] = float(psnr(watermarked, images).mean())
    return out


def watermark_figure(out: Union[str, Path], watermark: torch.Tensor, images: torch.Tensor,
                     watermarked: torch.Tensor, *, titles: Optional[Sequence[str]] = None,
                     max_rows: int = 4) -> Path:
    """Fig. 4 of OpenReview:d8VrVfNARSy / Fig. 6 of arXiv:2403.10476: (a) watermark, (b) originals, (c) watermarked, (d) |noise|
    (normalised per image). Written atomically (PNG/PDF from the suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    k = min(len(images), max_rows)
    wm = watermark.unsqueeze(0) if watermark.dim() == 3 else watermark
    show = lambda t: t.detach().double().cpu().permute(1, 2, 0).clamp(0, 1).numpy().squeeze()  # noqa: E731
    fig, axes = plt.subplots(k, 4, figsize=(8, 2.2 * k), squeeze=False)
    for i in range(k):
        noise = (watermarked[i].double() - images[i].double()).abs().cpu()
        noise = noise / noise.max().clamp_min(1e-12)
        panels = [(wm[min(i, len(wm) - 1)], "(a) watermark"), (images[i], "(b) original"),
                  (watermarked[i], "(c) watermarked"), (noise, "(d) |noise| (scaled)")]
        for j, (im, name) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(show(im), cmap="gray" if im.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.set_title(name if not titles or j != 2 else f"{name}\n{titles[i]}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    try:
        atomic_savefig(fig, out, dpi=110)
    finally:
        plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------
# watermark images: files and built-in ones
# ---------------------------------------------------------------------------------------------------------
def fit_watermark(wm: torch.Tensor, channels: int, size: Tuple[int, int]) -> torch.Tensor:
    """Bring a watermark ``(C, H, W)`` in [0, 1] to ``channels`` x ``size``: grey is repeated over the
    channels, RGB is averaged to grey for 1-channel models, and other sizes are **resized** (bilinear with
    antialiasing; the aspect ratio is not kept)."""
    import torch.nn.functional as F
    if wm.dim() != 3:
        raise NSPluginError(f"watermark must be a (C, H, W) image, got shape {tuple(wm.shape)}")
    if wm.shape[0] != channels:
        if wm.shape[0] == 1:
            wm = wm.expand(channels, -1, -1)
        elif channels == 1:
            wm = wm.mean(0, keepdim=True)
        else:
            raise NSPluginError(f"watermark has {wm.shape[0]} channels but the model takes {channels}")
    if tuple(wm.shape[-2:]) != tuple(size):
        wm = F.interpolate(wm[None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                           antialias=True)[0].clamp(0, 1)
    return wm.contiguous()


def read_image(path: Union[str, Path], what: str = "image") -> torch.Tensor:
    """Read an image file as ``(C, H, W)`` float in [0, 1] (grey stays 1 channel; alpha is composited on
    white; 16-bit images are scaled by 65535): :func:`ns_plugin.data.read_image`."""
    from ..data import read_image as _read
    return _read(path, what)


def write_image(path: Union[str, Path], x: torch.Tensor) -> Path:
    """Write ``(C, H, W)`` in [0, 1] as an 8-bit image (format from the suffix), atomically.

    Note: 8-bit rounding moves each pixel by up to 1/510, which leaves the nullspace; keep the float tensor
    (``--save-tensor``) when exact output preservation matters."""
    from PIL import Image
    path = Path(path)
    arr = (x.detach().double().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    from ..io import atomic_write
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    try:
        atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format=fmt))
    except (ValueError, OSError) as e:
        raise NSPluginError(f"cannot write image {str(path)!r}: {e}") from None
    return path


def text_watermark(text: str = "NS", size: Tuple[int, int] = (32, 32), channels: int = 3) -> torch.Tensor:
    """A built-in watermark: black ``text`` on white, rendered with PIL's default font, ``(C, H, W)``."""
    from PIL import Image, ImageDraw, ImageFont
    h, w = size
    big = Image.new("L", (8 * w, 8 * h), 255)
    draw = ImageDraw.Draw(big)
    try:
        font = ImageFont.load_default(size=int(5 * h / max(1, len(text.splitlines()))))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    tw, th = box[2] - box[0], box[3] - box[1]
    draw.multiline_text(((8 * w - tw) / 2 - box[0], (8 * h - th) / 2 - box[1]), text, fill=0, font=font,
                        align="center")
    small = big.resize((w, h), Image.LANCZOS)
    t = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]
    return t.expand(channels, h, w).contiguous()
