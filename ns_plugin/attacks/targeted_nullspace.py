import torch

from ..errors import NSPluginError
from ._base import NSAttack, TargetImagesMixin, project_box_nullspace


class TargetedNullspace(TargetImagesMixin, NSAttack):
    r"""
    Targeted nullspace noise from 'Nullspace of Vision Transformers and what does it tell us?' (Liu et al.;
    OpenReview:d8VrVfNARSy §6 Eq. 7, §7 and appendix A.2-A.3): make a source image look like a target image while the
    model still sees the source, by moving it only along the patch-embedding nullspace.

    Per patch, Eq. 7 asks for nullspace coefficients :math:`\lambda` with
    :math:`\min \|\Delta x_j - \sum_i e_i \lambda_i\|_p` s.t. :math:`0 \le x_j + \sum_i e_i\lambda_i \le 1`,
    :math:`\Delta x_j` = target patch - source patch. Two variants:

    * ``channels="all"`` (default): Eq. 7 with p = 2 solved exactly: the orthogonal projection of the
      change onto the nullspace (``box="clip"``: then clipped to [0, 1], which leaves the nullspace where
      pixels saturate) or its box-constrained version (``box="project"``, default: Dykstra projections
      onto {x + nullspace} ∩ [0, 1] and an exact per-patch shrink; the model's input embedding is unchanged
      to float precision). The paper solves Eq. 7 with SLSQP and p = 1; p = 2 has this closed form.
    * ``channels="red"``: appendix A.3's "unconstrained targeted noise": green and blue of the output are
      set to the target's and only the red channel is solved for, minimising the distance of the change to
      the nullspace (``objective="nullspace"``, Eq. 7's residual) or the change of the patch embedding
      itself (``objective="embedding"``, :math:`\|W \Delta x\|`), with red kept in [0, 1] (box-constrained
      least squares by FISTA, started from the unconstrained least-squares solution). This is NOT exact
      invariance in general: with ``d`` embedding dims and ``r^2`` red pixels per patch the red-only system
      has ``d`` equations in ``r^2`` unknowns (ViT-B/16: 768 vs 256, over-determined, so a residual remains:
      the paper's "the transformation is not perfect"); on the embedded tiny ViT (d = 64 = r^2) the
      unconstrained system is square and solvable, but the [0, 1] box usually leaves a residual. The
      measured residual and prediction agreement are in ``last_info``.

    Distance Measure : L2 (to the target image)

    Arguments:
        model (nn.Module): model to attack.
        target (torch.Tensor or None): target images (N, C, H, W), (1, C, H, W) or (C, H, W) in [0, 1];
            can also be set with :meth:`set_target_images` or passed per call as ``target_images=``.
            None: each image is pulled towards the mirrored next image of its batch. (Default: None)
        channels (str): ``"all"`` or ``"red"`` (appendix A.3 variant). (Default: "all")
        box (str): ``"project"`` (stay in [0, 1] exactly) or ``"clip"`` (unconstrained, then clamped).
            (Default: "project")
        objective (str): for ``channels="red"``: ``"nullspace"`` (Eq. 7) or ``"embedding"``. (Default: "nullspace")
        iters (int): Dykstra (all channels) or FISTA (red) iterations. (Default: 100)

    After a call, ``atk.last_info`` holds per image ``target_l2_before``/``target_l2_after`` (distance to the
    target), ``pixel_change_l2``, and ``embedding_residual`` (max |W·Δx| over patches), ``pred_match``
    and ``max_logit_diff`` (source vs output).

    Shape:
        - images: :math:`(N, C, H, W)` where `N = number of batches`, `C = number of channels`,
          `H = height` and `W = width`. It must have a range [0, 1].
        - labels: :math:`(N)` (optional, only shape-checked: the attack keeps the model's prediction).
        - output: :math:`(N, C, H, W)`.

    Examples::
        >>> attack = torchattacks.TargetedNullspace(model)
        >>> attack.set_target_images(watermarks)
        >>> adv_images = attack(images, labels)   # looks more like `watermarks`, classified like `images`

    """

    def __init__(self, model, target=None, channels="all", box="project", objective="nullspace", iters=100):
        super().__init__("TargetedNullspace", model)
        if channels not in ("all", "red"):
            raise NSPluginError(f"channels must be 'all' or 'red', got {channels!r}")
        if box not in ("project", "clip"):
            raise NSPluginError(f"box must be 'project' or 'clip', got {box!r}")
        if objective not in ("nullspace", "embedding"):
            raise NSPluginError(f"objective must be 'nullspace' or 'embedding', got {objective!r}")
        self.channels = channels
        self.box = box
        self.objective = objective
        self.iters = int(iters)
        self.supported_mode = ["default"]
        ns = self._nullspace()  # fails here on models without a patch nullspace
        if channels == "all" and ns.nullity == 0:
            raise NSPluginError("this model's patch embedding is full rank (nullity 0): targeted nullspace noise "
                                "over all channels is impossible; try channels='red'")
        if channels == "red" and ns.in_chans < 2:
            raise NSPluginError("channels='red' needs a model with at least 2 input channels")
        if target is not None:
            self.set_target_images(target)

    def forward(self, images, labels=None, target_images=None):
        r"""
        Overridden.
        """
        images, target = self._prepare(images, labels, target_images)
        ns = self._nullspace()
        x64, t64 = images.to(torch.float64), target.to(torch.float64)
        if self.channels == "all":
            if self.box == "clip":
                v = (x64 + ns.project(t64 - x64)).clamp(0, 1) - x64
            else:
                v = project_box_nullspace(ns, x64, t64, self.iters)
        else:
            v = self._red_only(ns, x64, t64)
        adv_images = (x64 + v).clamp(0, 1).to(images.dtype).detach()

        n = len(images)
        with torch.no_grad():
            a, b = self.get_logits(images), self.get_logits(adv_images)
        d = lambda u: u.reshape(n, -1).norm(dim=1).float().cpu()  # noqa: E731
        self._set_info({
            "target_l2_before": d(t64 - x64), "target_l2_after": d(t64 - adv_images.to(torch.float64)),
            "pixel_change_l2": d(adv_images.to(torch.float64) - x64),
            "embedding_residual": ns.embedding_residual((adv_images.to(torch.float64) - x64).cpu()) if n else 0.0,
            "pred_match": float((a.argmax(1) == b.argmax(1)).float().mean()) if n else 1.0,
            "max_logit_diff": float((a - b).abs().max()) if n else 0.0,
        })
        return adv_images

    def _red_only(self, ns, x64, t64):
        """Appendix A.3: G, B := target; red solved by (box-constrained) least squares, batched over patches
        (:func:`ns_plugin.nullspace.exact.solve_channels`)."""
        from ..nullspace.exact import solve_channels
        out = solve_channels(ns, x64, t64, channels=(0,), objective=self.objective, box=self.box == "project",
                             iters=self.iters)
        return out - x64
