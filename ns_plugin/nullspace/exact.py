"""Exact nullspace of a ViT's patch embedding (arXiv:2403.10476 §3.1, Eq. 2 and Table 1; OpenReview:d8VrVfNARSy §3).

A patch embedding with kernel == stride and no padding applies one linear map ``W: R^{c·rh·rw} -> R^d`` to
every patch independently. When ``c·rh·rw > d`` (rank-nullity) it has a non-trivial nullspace, and any
perturbation whose every patch lies in it leaves the patch tokens — hence the whole network's output —
unchanged: ``f(x + v) = f(x)`` for all ``x``.

Rank tolerance: singular values ``s_i <= tol`` count as zero, with the default
``tol = max(d, n) * eps(dtype) * s_max`` where ``dtype`` is the dtype the weights are *stored* in (NumPy's
``matrix_rank`` and SciPy's ``null_space`` rule for an array of that dtype). The SVD itself runs in float64,
but a float32-stored map is only known to float32 precision: a singular value set to zero before storing it
in float32 comes back at ~1e-9 relative, which a float64 cut-off (~1e-13) would count as non-zero.
A randomly initialised (or generically trained) map is full rank, so from the architecture alone the nullity
is ``max(0, c·rh·rw - d)``. Trained weights can be rank deficient: the paper reports nullity 2 for the
released ViT-B/16 weights although ``c·r² = 768 = d`` would give 0 for a full-rank map; that row of Table 1
depends on the weights, every other row follows from the shapes.

Pixel space: ns_plugin models are ``Sequential(Normalize, net)`` and take images in [0, 1]. The normaliser
divides channel ``k`` by ``std_k``, so the map seen from pixels is ``W · diag(1/std)``; its nullspace is the
one returned (``space="pixel"``). ``space="normalized"`` gives the nullspace of ``W`` itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import NSPluginError
from ..models import unwrap


def find_patch_projection(model: nn.Module) -> Tuple[str, nn.Conv2d]:
    """The model's first layer if it is a non-overlapping linear patch projection, as ``(name, conv)``.

    Looks for timm's ``patch_embed.proj`` (ViT, DeiT, BEiT, EVA, Swin...), ConvNeXt's ``stem.0``, or
    else the first ``Conv2d`` the model applies. Raises :class:`NSPluginError` when that layer overlaps
    (kernel != stride), pads, dilates or groups channels: then patches share pixels and no per-patch
    nullspace exists.
    """
    _, core = unwrap(model)
    conv, name = None, None
    pe = getattr(core, "patch_embed", None)
    if pe is not None and getattr(pe, "backbone", None) is not None:
        raise NSPluginError(f"{type(core).__name__} is a hybrid ViT: its patch embedding runs a CNN backbone "
                            f"first, so the exact patch-embedding nullspace is not defined; use the approximate "
                            f"(input-level) noise generator in ns_plugin.nullspace.search instead")
    if pe is not None and isinstance(getattr(pe, "proj", None), nn.Conv2d):
        conv, name = pe.proj, "patch_embed.proj"
    elif isinstance(getattr(core, "stem", None), nn.Sequential) and isinstance(core.stem[0], nn.Conv2d):
        conv, name = core.stem[0], "stem.0"
    else:
        for n, m in core.named_modules():
            if isinstance(m, nn.Conv2d):
                conv, name = m, n
                break
    if conv is None:
        raise NSPluginError(f"{type(core).__name__} has no convolutional patch projection, so the exact "
                            f"patch-embedding nullspace is not defined; use the approximate (input-level) noise "
                            f"generator in ns_plugin.nullspace.search instead")
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    pad = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    if k != s or pad not in ((0, 0), "valid") or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        raise NSPluginError(f"{type(core).__name__}'s first layer {name} is an overlapping convolution "
                            f"(kernel {k}, stride {s}, padding {pad}): patches share pixels, so the exact "
                            f"patch-embedding nullspace is not defined; use the approximate (input-level) noise "
                            f"generator in ns_plugin.nullspace.search instead")
    return name, conv


@dataclass
class PatchNullspace:
    """Orthonormal basis of the nullspace of a patch-embedding map, with tools to use it on images.

    ``basis`` has shape ``(nullity, c·rh·rw)`` (float64, orthonormal rows) in the flatten order of the conv
    weight, ``(channel, row, column)``. Patches are ordered as timm's tokens (row-major over the grid).
    """
    basis: torch.Tensor
    weight: torch.Tensor
    singular_values: torch.Tensor
    tol: float
    patch_size: Tuple[int, int]
    in_chans: int
    embed_dim: int
    image_size: Optional[Tuple[int, int]] = None
    layer: str = "patch_embed.proj"
    space: str = "pixel"
    _cache: Dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def nullity(self) -> int:
        """Dimension of the nullspace (``input_dim - rank``)."""
        return int(self.basis.shape[0])

    @property
    def input_dim(self) -> int:
        """``c·rh·rw``: the dimension of one flattened patch."""
        return int(self.basis.shape[1])

    @property
    def rank(self) -> int:
        return self.input_dim - self.nullity

    def to_dict(self) -> Dict[str, object]:
        """The basis and patch geometry as plain tensors/ints (``torch.save`` + ``weights_only`` loading work);
        what a saved nullspace fingerprint holds."""
        return {"basis": self.basis.clone(), "patch_size": list(self.patch_size), "in_chans": self.in_chans,
                "embed_dim": self.embed_dim, "layer": self.layer}

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "PatchNullspace":
        """Inverse of :meth:`to_dict` (the embedding weight is not stored: ``weight`` is empty)."""
        try:
            basis = torch.as_tensor(d["basis"], dtype=torch.float64)
            return cls(basis=basis, weight=torch.zeros(0, basis.shape[1], dtype=torch.float64),
                       singular_values=torch.zeros(0, dtype=torch.float64), tol=float("nan"),
                       patch_size=tuple(int(v) for v in d["patch_size"]), in_chans=int(d["in_chans"]),
                       embed_dim=int(d["embed_dim"]), layer=str(d.get("layer", "")))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise NSPluginError(f"not a nullspace fingerprint ({e}); make one with fingerprint(model)") from None

    def __repr__(self) -> str:
        return (f"PatchNullspace(nullity={self.nullity}, input_dim={self.input_dim}, embed_dim={self.embed_dim}, "
                f"patch_size={self.patch_size}, space={self.space!r})")

    # -- patches <-> images ---------------------------------------------------------------------------
    def _grid(self, image_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        size = image_size or self.image_size
        if size is None:
            raise NSPluginError("this model takes any image size; pass image_size=(H, W)")
        (h, w), (rh, rw) = size, self.patch_size
        if h % rh or w % rw:
            raise NSPluginError(f"image size {h}x{w} is not a multiple of the patch size {rh}x{rw}")
        return h // rh, w // rw

    def to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` (or ``(C, H, W)``) -> ``(N, P, c·rh·rw)`` in token order."""
        x = x.unsqueeze(0) if x.dim() == 3 else x
        n, c, h, w = x.shape
        if c != self.in_chans:
            raise NSPluginError(f"images have {c} channels but the patch embedding expects {self.in_chans}")
        gh, gw = self._grid((h, w))
        rh, rw = self.patch_size
        return x.reshape(n, c, gh, rh, gw, rw).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * rh * rw)

    def from_patches(self, p: torch.Tensor, image_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Inverse of :meth:`to_patches`: ``(N, P, c·rh·rw)`` -> ``(N, C, H, W)``."""
        gh, gw = self._grid(image_size)
        rh, rw = self.patch_size
        n = p.shape[0]
        if p.shape[1] != gh * gw:
            raise NSPluginError(f"got {p.shape[1]} patches but a {gh}x{gw} grid has {gh * gw}")
        return p.reshape(n, gh, gw, self.in_chans, rh, rw).permute(0, 3, 1, 4, 2, 5).reshape(
            n, self.in_chans, gh * rh, gw * rw)

    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = self.basis.to(dtype=like.dtype, device=like.device)
        return self._cache[key]

    # -- sampling and projection ----------------------------------------------------------------------
    def coefficients_to_image(self, coeffs: torch.Tensor, image_size: Optional[Tuple[int, int]] = None
                              ) -> torch.Tensor:
        """Eq. 2 per patch: ``v_p = sum_i coeffs[n, p, i] · b_i``, assembled into ``(N, C, H, W)``."""
        if coeffs.shape[-1] != self.nullity:
            raise NSPluginError(f"coefficients have last dimension {coeffs.shape[-1]}, expected the nullity {self.nullity}")
        return self.from_patches(coeffs @ self._basis(coeffs), image_size)

    def sample(self, n: int = 1, scale: float = 1.0, *, per_patch: bool = True,
               generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
               image_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Random nullspace noise (Eq. 2) as images ``(n, C, H, W)``.

        Coefficients are i.i.d. ``N(0, scale²)`` on the orthonormal basis, so a patch's noise has expected
        l2 norm ``scale·sqrt(nullity)``. ``per_patch=False`` draws one patch noise and tiles it over the grid.
        """
        if self.nullity == 0:
            raise NSPluginError("the patch embedding is full rank (nullity 0): there is no exact nullspace noise; "
                                "use the approximate generator in ns_plugin.nullspace.search")
        gh, gw = self._grid(image_size)
        shape = (n, gh * gw if per_patch else 1, self.nullity)
        from ..validation import Float
        scale = Float(0)(scale, "scale")
        coeffs = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
        coeffs = coeffs.expand(n, gh * gw, self.nullity)
        return self.coefficients_to_image(coeffs, image_size or self.image_size).to(dtype)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of a perturbation ``(N, C, H, W)`` or ``(C, H, W)`` onto the nullspace,
        patch by patch (the closest nullspace noise in l2)."""
        squeeze = delta.dim() == 3
        p = self.to_patches(delta)
        b = self._basis(p)
        out = self.from_patches((p @ b.T) @ b, tuple(delta.shape[-2:]))
        return out[0] if squeeze else out

    def embedding_residual(self, delta: torch.Tensor) -> float:
        """``max |W · patch|`` over patches of ``delta``: 0 (to float error) for nullspace noise."""
        p = self.to_patches(delta.to(torch.float64))
        return float((p @ self.weight.to(p.device).T).abs().max())

    @staticmethod
    def max_scale(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Largest ``s >= 0`` per image with ``x + s·v`` inside [0, 1] (``inf`` where ``v == 0``).

        Scaling keeps ``v`` in the nullspace, so invariance is exact; clipping ``x + v`` to [0, 1] instead
        changes the perturbation to ``clip(x + v) - x``, which in general leaves the nullspace and changes the
        output (see :func:`verify_invariance`).
        """
        x = x.unsqueeze(0) if x.dim() == 3 else x
        v = v.unsqueeze(0) if v.dim() == 3 else v
        return box_scale(x, v.expand_as(x))


def solve_channels(ns: "PatchNullspace", source: torch.Tensor, target: torch.Tensor, *,
                   channels: Sequence[int] = (0,), objective: str = "embedding", box: bool = False,
                   iters: int = 100, rcond: Optional[float] = None) -> torch.Tensor:
    """Targeted noise with free channels ("Nullspace of Vision Transformers and what does it tell us?",
    appendix A.3): the output takes the target's values in every channel except ``channels`` (default red
    only), which are solved, patch by patch, so that the output matches the source as seen by the patch
    embedding. The one implementation behind ``TargetedNullspace(channels="red")`` and
    ``nullspace_transform(mode="channels")``.

    ``objective="embedding"`` minimises ``||W (out - source)||`` (W: the patch embedding);
    ``"nullspace"`` the distance of ``out - source`` to the nullspace (Eq. 7's residual). The unconstrained
    solution is the least-squares one closest to the target: ``z = t_free + pinv(A_free) A (s - t)`` (``rcond``:
    relative cut-off of the pseudo-inverse). ``box=True`` keeps the solved channels in [0, 1] (box-constrained
    least squares by FISTA, ``iters`` steps, started from the clamped unconstrained solution). Not exact in
    general: with ``d`` embedding dims and ``|free|`` pixels per patch the system has ``d`` equations in
    ``|free|`` unknowns. Returns the output image in float64.
    """
    c, (rh, rw) = ns.in_chans, ns.patch_size
    chans = sorted(set(int(ch) for ch in channels))
    if not chans or chans[0] < 0 or chans[-1] >= c:
        raise NSPluginError(f"channels must be a non-empty subset of 0..{c - 1}, got {tuple(channels)}")
    if objective not in ("embedding", "nullspace"):
        raise NSPluginError(f"objective must be 'nullspace' or 'embedding', got {objective!r}")
    if rcond is not None and not 0 <= rcond < 1:
        raise NSPluginError(f"rcond must be in [0, 1), got {rcond}")
    s64, t64 = source.to(torch.float64), target.to(torch.float64)
    dev = s64.device
    w = ns.weight.to(dev, torch.float64)
    if objective == "embedding":
        a = w                                               # (d, c·r²): the patch embedding itself
    else:                                                   # orthonormal basis of the row space
        a = torch.linalg.svd(w, full_matrices=True)[2][:ns.input_dim - ns.nullity]
    basis = ns.basis.to(dev, torch.float64)
    if basis.numel():
        a = a - (a @ basis.T) @ basis                       # exact orthogonality to the computed nullspace
    free = torch.cat([torch.arange(ch * rh * rw, (ch + 1) * rh * rw) for ch in chans]).to(dev)
    a_free = a[:, free]
    ps, pt = ns.to_patches(s64), ns.to_patches(t64)         # (N, P, c·r²)
    z = pt[..., free] + ((ps - pt) @ a.T) @ torch.linalg.pinv(a_free, rtol=rcond).T
    if box:
        rhs = pt[..., free] @ a_free.T + (ps - pt) @ a.T    # want a_free · z = rhs
        lip = max(float(torch.linalg.matrix_norm(a_free, ord=2)) ** 2, 1e-12)
        ata, atb = a_free.T @ a_free, rhs @ a_free
        z = z.clamp(0, 1)
        y, zp, tk = z.clone(), z.clone(), 1.0
        for _ in range(int(iters)):  # FISTA on 0.5·||a_free z - rhs||² over the box [0, 1]
            zn = (y - (y @ ata - atb) / lip).clamp(0, 1)
            tn = (1 + (1 + 4 * tk * tk) ** 0.5) / 2
            y = zn + ((tk - 1) / tn) * (zn - zp)
            zp, tk = zn, tn
        z = zp
    out = pt.clone()
    out[..., free] = z
    return ns.from_patches(out, tuple(s64.shape[-2:]))


def box_scale(x: torch.Tensor, v: torch.Tensor, *, start_dim: int = 1, tiny: float = 1e-30) -> torch.Tensor:
    """The one "largest scale that keeps an image in [0, 1]": the largest ``s >= 0`` with ``x + s·v`` inside
    [0, 1], taken over the dimensions from ``start_dim`` on (``inf`` where ``v`` is 0 there). ``x`` and ``v``
    have the same shape. Used per image (:meth:`PatchNullspace.max_scale`), per patch (the attacks) and per
    patch row (the watermark solvers)."""
    inf = torch.full_like(x, float("inf"))
    up = torch.where(v > 0, (1 - x) / v.clamp_min(tiny), inf)
    down = torch.where(v < 0, x / (-v).clamp_min(tiny), inf)
    return torch.minimum(up, down).flatten(start_dim).min(-1).values.clamp_min(0)


def exact_nullspace(model: nn.Module, *, tol: Optional[float] = None, space: str = "pixel") -> PatchNullspace:
    """Compute the patch-embedding nullspace of ``model`` by SVD (arXiv:2403.10476 §3.1, Table 1).

    Args:
        model: a timm ViT-style model, optionally ``Sequential(Normalize, model)``; DDP wrappers are fine.
        tol: singular values ``<= tol`` count as zero. Default ``max(d, n) · eps(dtype) · s_max`` with the dtype
            the weights are stored in (float32 for usual checkpoints), as ``numpy.linalg.matrix_rank`` and
            ``scipy.linalg.null_space`` do for an array of that dtype.
        space: ``"pixel"`` (default; folds the normaliser's std into the map, for images in [0, 1]) or
            ``"normalized"`` (the conv weight itself).

    Returns:
        :class:`PatchNullspace` with ``.basis`` (nullity x c·rh·rw, orthonormal rows), ``.nullity``,
        ``.sample()``, ``.project()`` ...

    Example::

        ns = ns_plugin.exact_nullspace(model)
        v = ns.sample(8, scale=0.05)               # (8, 3, 32, 32)
        s = ns.max_scale(x, v)                     # keep x + s·v inside [0, 1]
    """
    if space not in ("pixel", "normalized"):
        raise NSPluginError(f"space must be 'pixel' or 'normalized', got {space!r}")
    norm, core = unwrap(model)
    name, conv = find_patch_projection(model)
    if conv.weight.is_meta:
        raise NSPluginError("the model's weights are on the meta device; build it with real weights")
    stored = conv.weight.dtype
    w = conv.weight.detach().to("cpu", torch.float64)
    d, c, rh, rw = w.shape
    if space == "pixel" and norm is not None:
        std = norm.std.detach().to("cpu", torch.float64).reshape(-1)
        if std.numel() == 1:
            std = std.expand(c)
        if std.numel() != c:
            raise NSPluginError(f"the normaliser has {std.numel()} channels but the patch embedding expects {c}")
        w = w / std[None, :, None, None]
    mat = w.reshape(d, c * rh * rw)
    if not torch.isfinite(mat).all():
        raise NSPluginError(f"the weights of {name} contain NaN or inf; the nullspace is undefined")
    _, s, vh = torch.linalg.svd(mat, full_matrices=True)
    n = mat.shape[1]
    if tol is None:
        eps = torch.finfo(stored if stored.is_floating_point else torch.float64).eps
        tol = max(d, n) * eps * (float(s[0]) if s.numel() else 0.0)
    else:
        from ..validation import Float
        tol = Float(0)(tol, "tol")
    rank = int((s > tol).sum())
    img = None
    pe = getattr(core, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None and not getattr(pe, "dynamic_img_size", False):
        img = tuple(int(t) for t in pe.img_size)
    return PatchNullspace(basis=vh[rank:].contiguous(), weight=mat, singular_values=s, tol=float(tol),
                          patch_size=(rh, rw), in_chans=c, embed_dim=d, image_size=img, layer=name, space=space)


@torch.no_grad()
def verify_invariance(model: nn.Module, x: torch.Tensor, v: torch.Tensor, *,
                      dtype: torch.dtype = torch.float64, clip: bool = False) -> Dict[str, float]:
    """Compare ``model`` on ``x`` and ``x + v`` (``clip=True``: on ``clamp(x + v, 0, 1)``).

    Runs on a copy of the model in ``dtype`` (float64 by default, so float error is ~1e-12) and returns the
    largest absolute difference of the patch-embedding output and of the logits, and the fraction of equal
    predictions.
    """
    import copy
    m = copy.deepcopy(model).to(dtype).eval()
    x, v = x.to(dtype), v.to(dtype)
    x_noisy = (x + v).clamp(0, 1) if clip else x + v
    _, conv = find_patch_projection(m)
    outs: List[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda mod, inp, out: outs.append(out))
    try:
        a, b = m(x), m(x_noisy)
    finally:
        hook.remove()
    return {"max_embed_diff": float((outs[0] - outs[1]).abs().max()),
            "max_logit_diff": float((a - b).abs().max()),
            "pred_match": float((a.argmax(1) == b.argmax(1)).double().mean())}


def _build_architecture(name: str) -> nn.Module:
    """A randomly initialised timm model (``pretrained=False``, nothing downloaded). The patch embedding does
    not depend on depth, so ViT-style models are built with one block when they accept ``depth=1``."""
    import timm
    if name not in timm.list_models():
        close = [m for m in timm.list_models() if name.split("_")[0] in m][:3]
        raise NSPluginError(f"unknown timm model {name!r}" + (f"; e.g. {', '.join(close)}" if close else
                                                               "; see timm.list_models()"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)   # the same random init every time: a square float32 map (ViT-B/16) is
        try:                   # numerically rank deficient for some draws (s_min/s_max ~ 1e-6)
            return timm.create_model(name, pretrained=False, depth=1)
        except Exception:  # noqa: BLE001 - models without a scalar depth argument: build them whole
            return timm.create_model(name, pretrained=False)


def table1(names: Iterable[str], *, progress: bool = False) -> List[Dict[str, object]]:
    """Paper Table 1 from architectures alone: for each timm model name, the patch size, embedding dim ``d``,
    input dim ``c·r²`` and the nullity of its patch embedding, computed by SVD on randomly initialised
    weights (no download, seeded init). A random map is full rank, so this equals ``max(0, c·r² - d)``; trained
    weights can only raise it (the paper's ViT-B/16 row: 2 with the released weights, 0 from the shapes). The
    rank cut-off is float32's (the weights' dtype): about 1 in 10 random draws of the square 768x768 ViT-B/16
    map has ``s_min/s_max`` below it, so the init is seeded to give the shape value."""
    from tqdm.auto import tqdm
    rows = []
    for name in tqdm(list(names), desc="patch nullspaces", disable=not progress):
        ns = exact_nullspace(_build_architecture(name), space="normalized")
        rh, rw = ns.patch_size
        rows.append({"model": name, "patch_size": f"{rh}x{rw}", "embed_dim": ns.embed_dim,
                     "input_dim": ns.input_dim, "nullity": ns.nullity,
                     "shape_nullity": max(0, ns.input_dim - ns.embed_dim), "layer": ns.layer})
    return rows


#: The rows of the paper's Table 1 (arXiv:2403.10476) as timm names, with the nullity the paper reports.
PAPER_TABLE1 = {
    "vit_tiny_patch16_224": 576, "vit_small_patch32_224": 2688, "vit_small_patch16_224": 384,
    "vit_base_patch32_224": 2304, "vit_base_patch16_224": 2, "vit_base_patch8_224": 0,
    "vit_large_patch32_224": 2048, "vit_large_patch16_224": 0,
}


def figure2(model: nn.Module, out, *, x: Optional[torch.Tensor] = None, scale: Optional[float] = None,
            n: int = 4, seed: int = 0) -> Dict[str, object]:
    """Fig. 2 of arXiv:2403.10476 / Fig. 1 of OpenReview:d8VrVfNARSy: image, nullspace noise, noisy image and
    the predictions, for ``n`` images (default: digits test images). Writes a PNG atomically and returns the measured numbers.

    ``scale`` is the coefficient scale of :meth:`PatchNullspace.sample`; by default it gives a per-pixel noise
    std of 0.1. The model sees ``x + v`` unclipped (exact invariance); the figure also reports the prediction on
    ``clamp(x + v, 0, 1)``, which leaves the nullspace wherever pixels saturate (digits have black backgrounds,
    so :meth:`PatchNullspace.max_scale` is 0 for them).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data import load_digits
    from ..io import check_figure_suffix
    from ..validation import Float

    check_figure_suffix(out)
    if scale is not None:
        scale = Float(0, lo_open=True)(scale, "scale")
    ns = exact_nullspace(model)
    if x is None:
        x = load_digits().test.tensors[0][:n]
    if scale is None:
        scale = 0.1 * (ns.input_dim / max(ns.nullity, 1)) ** 0.5
    v = ns.sample(len(x), scale, generator=torch.Generator().manual_seed(seed))
    noisy = x + v
    with torch.no_grad():
        model.eval()
        p_clean, p_noisy, p_clip = (model(t).softmax(1) for t in (x, noisy, noisy.clamp(0, 1)))
    fig, axes = plt.subplots(len(x), 3, figsize=(7, 2.4 * len(x)), squeeze=False)
    show = lambda t: t.permute(1, 2, 0).clamp(0, 1).numpy()  # noqa: E731
    for i in range(len(x)):
        vi = v[i]
        axes[i, 0].imshow(show(x[i]))
        axes[i, 0].set_title(f"image: pred {int(p_clean[i].argmax())} ({float(p_clean[i].max()):.3f})", fontsize=8)
        axes[i, 1].imshow(show((vi - vi.min()) / (vi.max() - vi.min() + 1e-12)))
        axes[i, 1].set_title(f"nullspace noise, |v|∞={float(vi.abs().max()):.2f}", fontsize=8)
        axes[i, 2].imshow(show(noisy[i]))
        axes[i, 2].set_title(f"x+v: pred {int(p_noisy[i].argmax())} ({float(p_noisy[i].max()):.3f})\n"
                             f"clipped: pred {int(p_clip[i].argmax())} ({float(p_clip[i].max()):.3f})", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(f"exact patch-embedding nullspace noise (nullity {ns.nullity} of {ns.input_dim})", fontsize=9)
    fig.tight_layout()
    from ..io import atomic_savefig
    try:
        atomic_savefig(fig, out, dpi=100)
    finally:
        plt.close(fig)
    same = lambda p: float((p_clean.argmax(1) == p.argmax(1)).float().mean())  # noqa: E731
    return {"nullity": ns.nullity, "pred_match": same(p_noisy), "max_prob_diff": float((p_clean - p_noisy).abs().max()),
            "pred_match_clipped": same(p_clip), "max_prob_diff_clipped": float((p_clean - p_clip).abs().max()),
            "noise_linf": float(v.abs().max())}
