"""Shared pieces of the ns_plugin attacks: input checks torchattacks 3.5 no longer does, and access to the
model's parts (normaliser, core network, patch nullspace) whether the normalisation lives inside the model
(ns_plugin / EasyRobust convention) or was declared with ``Attack.set_normalization_used``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import NSPluginError

#: Slack allowed on [0, 1] when torchattacks has just inverse-normalised the inputs (float round-off).
_ROUNDOFF = 1e-5


def import_attack_base():
    """``torchattacks.attack.Attack``, with a clear error when torchattacks is missing."""
    try:
        from torchattacks.attack import Attack
    except ImportError:  # pragma: no cover - depends on the environment
        raise NSPluginError("torchattacks is not installed; run: pip install --no-deps torchattacks==3.5.1") from None
    return Attack


Attack = import_attack_base()


class NSAttack(Attack):
    """Base class of the ns_plugin attacks: a ``torchattacks.Attack`` with input checks.

    Subclasses call :meth:`_check_inputs` (images in [0, 1], 4-D, finite, of the model's input size) and
    :meth:`_check_labels` at the start of ``forward``; ``last_info`` holds the measurements of the last call.
    """

    def __init__(self, name: str, model: nn.Module):
        super().__init__(name, model)
        self._set_info({})

    def _set_info(self, info: dict) -> None:
        """Store ``last_info`` (bypassing torchattacks' ``__setattr__``, which walks values looking for
        sub-attacks and cannot compare tensors)."""
        object.__setattr__(self, "last_info", info)

    # -- checks ---------------------------------------------------------------------------------------
    def _check_inputs(self, images: torch.Tensor, what: str = "images") -> torch.Tensor:
        """Return ``images`` detached on the attack's device after checking them.

        torchattacks 3.5 removed its own [0, 1] check; an attack given normalised images would silently
        clamp them into nonsense, so we refuse them. Under ``set_normalization_used`` torchattacks inverse-
        normalises the inputs first, which can leave round-off of ~1e-7 outside [0, 1]: that is clamped.
        """
        from ..models import check_images
        if not isinstance(images, torch.Tensor):
            raise NSPluginError(f"{what} must be a torch.Tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
        images = images.detach()
        if images.is_floating_point() and self.normalization_used is not None and images.numel():
            lo, hi = float(images.min()), float(images.max())
            if -_ROUNDOFF <= lo and hi <= 1 + _ROUNDOFF:
                images = images.clamp(0, 1)
        if not images.is_floating_point():
            raise NSPluginError(f"{what} must be float images in [0, 1], got dtype {images.dtype}; "
                                f"convert with images.float() / 255")
        check_images(images, self._model_with_normalizer(), what=what)
        return images.to(self._device_of(images))

    def _check_labels(self, labels: Optional[torch.Tensor], n: int, *, required: bool = True,
                      num_classes: Optional[int] = None) -> Optional[torch.Tensor]:
        """``labels`` as a (N,) long tensor on the attack's device, or a clear error."""
        if labels is None:
            if required:
                raise NSPluginError(f"{self.attack} needs labels: call atk(images, labels) with a (N,) tensor of class indices")
            return None
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != n:
            raise NSPluginError(f"labels must have shape ({n},) (one class index per image), got {tuple(labels.shape)}; "
                                f"pass class indices, not one-hot vectors")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise NSPluginError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if n and int(labels.min()) < 0:
            raise NSPluginError(f"labels must be class indices >= 0, got {int(labels.min())}")
        if num_classes is not None and n and int(labels.max()) >= num_classes:
            raise NSPluginError(f"label {int(labels.max())} is out of range for a model with {num_classes} classes")
        return labels.long().to(self._device_of(labels))

    # -- model access ---------------------------------------------------------------------------------
    def _device_of(self, t: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else t.device

    def _model_with_normalizer(self) -> nn.Module:
        """The model as a function of [0, 1] images: ``self.model`` itself, or
        ``Sequential(Normalize(mean, std), self.model)`` when ``set_normalization_used`` declared it."""
        if self.normalization_used is None:
            return self.model
        from ..models import wrap
        mean = self.normalization_used["mean"].reshape(-1).tolist()
        std = self.normalization_used["std"].reshape(-1).tolist()
        key = (id(self.model), tuple(mean), tuple(std))
        cached = self.__dict__.get("_wrapped")
        if cached is None or cached[0] != key:
            wrapped = wrap(self.model, mean, std).to(self._param_device())
            object.__setattr__(self, "_wrapped", (key, wrapped))
            cached = self.__dict__["_wrapped"]
        return cached[1]

    def _param_device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _core(self) -> Tuple[Optional[nn.Module], nn.Module]:
        """``(normaliser or None, core network)`` of the model as seen from [0, 1] images."""
        from ..models import unwrap
        return unwrap(self._model_with_normalizer())

    def _nullspace(self):
        """The exact patch-embedding nullspace of the model in pixel space (cached until the patch-embedding
        weights or the normalisation change, so an attack built once keeps working while the model trains)."""
        from ..nullspace.exact import exact_nullspace, find_patch_projection
        model = self._model_with_normalizer()
        _, conv = find_patch_projection(model)
        norm, _ = self._core()
        std = tuple(norm.std.reshape(-1).tolist()) if norm is not None else None
        w = conv.weight
        key = (id(model), w.data_ptr(), w._version, std)
        cached = self.__dict__.get("_ns_cache")
        if cached is None or cached[0] != key:
            object.__setattr__(self, "_ns_cache", (key, exact_nullspace(model)))
        return self.__dict__["_ns_cache"][1]


def default_targets(images: torch.Tensor) -> torch.Tensor:
    """Targets used when none were set: image ``i`` is paired with the horizontally mirrored image ``i - 1``
    of the same batch (the mirrored image itself for a batch of one), so the attacks build from the model alone."""
    return images.roll(1, dims=0).flip(-1)


class TargetImagesMixin:
    """Target images for image-targeted attacks: set once (``target=`` / :meth:`set_target_images`) or per
    call (``atk(images, labels, target_images=t)``); one target for all images or one per image."""

    _target = None

    def set_target_images(self, target):
        r"""Set the target images (N, C, H, W), (1, C, H, W) or (C, H, W) in [0, 1]; None restores the default."""
        if target is not None:
            target = self._checked_targets(target)
        object.__setattr__(self, "_target", target)

    def _checked_targets(self, t):
        if isinstance(t, torch.Tensor) and t.dim() == 3:
            t = t.unsqueeze(0)
        return self._check_inputs(t, what="target images")

    def _prepare(self, images, labels, target_images=None):
        """The checked images and the target for each (shared prologue of the targeted attacks' forward)."""
        images = self._check_inputs(images)
        self._check_labels(labels, len(images), required=False)
        return images, self._targets_for(images, target_images)

    def _targets_for(self, images, target_images=None):
        t = target_images if target_images is not None else self._target
        if t is None:
            return default_targets(images)
        if target_images is not None:
            t = self._checked_targets(t)
        if tuple(t.shape[1:]) != tuple(images.shape[1:]):
            raise NSPluginError(f"target images have shape {tuple(t.shape[1:])} but the images have "
                                f"{tuple(images.shape[1:])}; resize the targets to the input size")
        if len(t) == 1:
            t = t.expand_as(images)
        elif len(t) != len(images):
            raise NSPluginError(f"got {len(t)} target images for {len(images)} images; pass one target or one per image")
        return t.to(images.device, images.dtype)


def _patch_scale(xp: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
    """(..., 1): per patch (last dimension), the largest s in [0, 1] with xp + s·vp inside [0, 1]."""
    from ..nullspace.exact import box_scale
    return box_scale(xp, vp, start_dim=xp.dim() - 1).clamp(max=1).unsqueeze(-1)


def patch_box_scale(ns, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-patch largest ``s`` in [0, 1] with ``x + s·v`` inside [0, 1] on that patch, as an image-shaped
    factor. Every patch of a nullspace perturbation lies in the nullspace on its own, so scaling patches
    independently keeps the perturbation exactly in the nullspace (clipping does not)."""
    xp, vp = ns.to_patches(x), ns.to_patches(v)
    s = _patch_scale(xp, vp)
    return ns.from_patches(s.expand_as(xp).contiguous(), tuple(x.shape[-2:]))


def project_box_nullspace(ns, x: torch.Tensor, goal: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """The point of ``{x + v : v in nullspace, x + v in [0, 1]}`` closest to ``goal`` (Dykstra's alternating
    projections between the affine nullspace set and the box), returned as the perturbation ``v``.

    Dykstra converges to the exact projection onto the intersection; after ``iters`` rounds the affine iterate
    is exactly in the nullspace but may overshoot the box by a little, so it is finally shrunk patch by patch
    (:func:`patch_box_scale`) into [0, 1]: the result is in the nullspace and in the box, exactly.
    Runs in float64 on flattened patches (the box and the nullspace both act patch by patch).
    """
    dt = x.dtype
    xp64 = ns.to_patches(x.to(torch.float64))
    shape = xp64.shape
    xp64 = xp64.reshape(-1, shape[-1])
    g = ns.to_patches(goal.to(torch.float64)).reshape(-1, shape[-1])
    b = ns.basis.to(xp64.device, torch.float64)
    proj64 = b.T @ b  # orthogonal projector onto the nullspace of one patch
    # the iterations run in float32 (fast); the final perturbation is re-projected in float64
    xp, proj = xp64.float(), proj64.float()
    y, p, q = g.float(), torch.zeros_like(xp), torch.zeros_like(xp)
    for _ in range(max(int(iters), 0)):
        a = xp + (y + p - xp) @ proj  # projection onto the affine set x + N
        p = y + p - a
        y = (a + q).clamp(0, 1)  # projection onto the box
        q = a + q - y
    v = ((y + p).double() - xp64) @ proj64 if iters > 0 else (g - xp64) @ proj64
    v = (v * _patch_scale(xp64, v)).reshape(shape)
    return ns.from_patches(v, tuple(x.shape[-2:])).to(dt)
