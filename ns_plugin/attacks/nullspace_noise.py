import torch

from ..errors import NSPluginError
from ._base import NSAttack, patch_box_scale, project_box_nullspace


class NullspaceNoise(NSAttack):
    r"""
    Exact patch-embedding nullspace noise, from 'Nullspace of Vision Transformers and what does it tell us?'
    (Liu et al.; OpenReview:d8VrVfNARSy §3, Eq. 2) and 'Approximate Nullspace Augmented Finetuning for Robust Vision
    Transformers' (arXiv:2403.10476 §3.1, Table 1).

    A ViT's patch embedding applies one linear map :math:`W: \mathbb{R}^{c r^2} \to \mathbb{R}^d` to every
    patch; when :math:`c r^2 > d` it has a nullspace, and noise whose every patch lies in it does not change
    the patch tokens, hence not the output. This "attack" is therefore a built-in sanity check for harnesses:
    on a ViT its robust accuracy equals the clean accuracy (up to float round-off at exact ties).
    Models without a non-overlapping linear patch projection (CNNs, hybrid ViTs) raise
    :class:`ns_plugin.NSPluginError` when the attack is built.

    Distance Measure : L2 (per-pixel RMS ``std`` before the [0, 1] box)

    Arguments:
        model (nn.Module): model to attack (``Sequential(Normalize, ViT)`` or a bare ViT with
            ``set_normalization_used``).
        std (float): per-pixel RMS of the noise: coefficients on the orthonormal nullspace basis are drawn
            i.i.d. :math:`N(0, s^2)` with :math:`s = std \cdot \sqrt{c r^2 / \text{nullity}}`. (Default: 0.1)
        box (str): how the noisy image is kept in [0, 1] without leaving the nullspace:
            ``"project"`` (default) the point of :math:`\{x + v: v \in N, x + v \in [0,1]\}` closest to
            ``x + noise`` (Dykstra projections, then an exact per-patch shrink); ``"shrink"`` only scales each
            patch's noise down until it fits; ``"clip"`` clamps ``x + noise`` to [0, 1] (leaves the nullspace
            where pixels saturate, so predictions may change: use it to measure that effect).
        seed (int or None): seed of the noise generator (None: torch's global RNG). (Default: 0)
        iters (int): Dykstra iterations for ``box="project"``. (Default: 50)

    After a call, ``atk.last_info`` holds ``noise_l2`` and ``noise_linf`` (per image, of the returned
    perturbation), ``kept`` (its l2 norm over the drawn noise's), ``embedding_residual`` (max |W·patch|) and
    ``pred_match`` (fraction of unchanged predictions).

    Shape:
        - images: :math:`(N, C, H, W)` where `N = number of batches`, `C = number of channels`,
          `H = height` and `W = width`. It must have a range [0, 1].
        - labels: :math:`(N)` (optional, unused except for the shape check).
        - output: :math:`(N, C, H, W)`.

    Examples::
        >>> attack = torchattacks.NullspaceNoise(model, std=0.1)
        >>> noisy_images = attack(images, labels)
        >>> assert (model(noisy_images).argmax(1) == model(images).argmax(1)).all()

    """

    def __init__(self, model, std=0.1, box="project", seed=0, iters=50):
        super().__init__("NullspaceNoise", model)
        from ..validation import Choice, Float, Int, check_args
        a = check_args("NullspaceNoise", std=(std, Float(0)), box=(box, Choice("project", "shrink", "clip")),
                       seed=(seed, Int(0, optional=True)), iters=(iters, Int(0)))
        self.std = a["std"]
        self.box = box
        self.seed = a["seed"]
        self.iters = a["iters"]
        self.supported_mode = ["default"]
        ns = self._nullspace()  # fails here, with the reason, on models without a patch nullspace
        if ns.nullity == 0:
            raise NSPluginError("this model's patch embedding is full rank (nullity 0): it has no exact nullspace "
                                "noise; use the approximate generator in ns_plugin.nullspace.search")

    def forward(self, images, labels=None):
        r"""
        Overridden.
        """
        images = self._check_inputs(images)
        self._check_labels(labels, len(images), required=False)
        ns = self._nullspace()
        gen = torch.Generator().manual_seed(int(self.seed)) if self.seed is not None else None
        scale = self.std * (ns.input_dim / ns.nullity) ** 0.5
        noise = ns.sample(len(images), scale, generator=gen, dtype=torch.float64,
                          image_size=tuple(images.shape[-2:])).to(images.device)
        x64 = images.to(torch.float64)
        if self.box == "clip":
            v = (x64 + noise).clamp(0, 1) - x64
        elif self.box == "shrink":
            v = noise * patch_box_scale(ns, x64, noise)
        else:
            v = project_box_nullspace(ns, x64, x64 + noise, self.iters)
        adv_images = (x64 + v).clamp(0, 1).to(images.dtype).detach()

        with torch.no_grad():
            clean = self.get_logits(images).argmax(1)
            noisy = self.get_logits(adv_images).argmax(1)
        n = len(images)
        drawn = noise.reshape(n, -1).norm(dim=1)
        self._set_info({
            "noise_l2": v.reshape(n, -1).norm(dim=1).float().cpu(),
            "noise_linf": v.reshape(n, -1).abs().amax(dim=1).float().cpu() if n else torch.zeros(0),
            "kept": (v.reshape(n, -1).norm(dim=1) / drawn.clamp_min(1e-12)).float().cpu(),
            "embedding_residual": ns.embedding_residual(v.cpu()) if n else 0.0,
            "pred_match": float((clean == noisy).float().mean()) if n else 1.0,
        })
        return adv_images
