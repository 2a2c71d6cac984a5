import torch
import torch.nn.functional as F

from ..errors import NSPluginError
from ._base import NSAttack, TargetImagesMixin


class EmbeddingMatch(TargetImagesMixin, NSAttack):
    r"""
    Embedding matching from 'Intriguing Equivalence Structures of the Embedding Space of Vision Transformers'
    (arXiv:2401.15568, Eq. 3-4; :func:`ns_plugin.anatomy.match_embedding`): perturb an input :math:`x_0` by
    gradient descent so that its representation matches a target's,

    .. math:: L(x_0 + \Delta x) = \tfrac12 \|f(x_0 + \Delta x) - f(x_{tg})\|^2, \qquad
              \nabla L \approx J_f(x_0)^T (f(x_0 + \Delta x) - f(x_{tg})),

    keeping the image in [0, 1] (projected gradient descent). The result looks like :math:`x_0` (small pixel
    change) but the model represents — and so classifies — it like the target.

    Distance Measure : L2 in representation space (pixel change reported, not bounded)

    Arguments:
        model (nn.Module): model to attack.
        target (torch.Tensor or None): target images (N, C, H, W), (1, C, H, W) or (C, H, W) in [0, 1]; also
            :meth:`set_target_images` or ``target_images=`` per call. None: the mirrored next image of the
            batch. (Default: None)
        representation (str): ``"pre_logits"`` (timm ``forward_head(forward_features(x), pre_logits=True)``:
            the final class-token embedding of a ViT), ``"features"`` (all final tokens, ``forward_features``)
            or ``"logits"``. Models without timm's ``forward_features`` support only ``"logits"``. (Default: "pre_logits")
        steps (int): gradient steps. (Default: 300)
        lr (float): step size. (Default: 0.01)
        optimizer (str): ``"adam"`` or ``"sgd"`` (plain gradient descent, Eq. 4). (Default: "adam")
        stop_cosine (float or None): stop early once every image's cosine similarity to its target
            representation reaches this value. (Default: 0.999)

    After a call, ``atk.last_info`` holds per image ``cosine`` (final cosine similarity of the representations),
    ``cosine_start``, ``pixel_change_mean_abs`` (the paper's average pixel value difference),
    ``pixel_change_linf``, and ``loss`` (Eq. 3, per image) and ``steps`` (steps run).

    Shape:
        - images: :math:`(N, C, H, W)` where `N = number of batches`, `C = number of channels`,
          `H = height` and `W = width`. It must have a range [0, 1].
        - labels: :math:`(N)` (optional, only shape-checked).
        - output: :math:`(N, C, H, W)`.

    Examples::
        >>> attack = torchattacks.EmbeddingMatch(model, steps=500)
        >>> adv_images = attack(images, labels, target_images=targets)
        >>> attack.last_info["cosine"]

    """

    def __init__(self, model, target=None, representation="pre_logits", steps=300, lr=0.01, optimizer="adam",
                 stop_cosine=0.999):
        super().__init__("EmbeddingMatch", model)
        if representation not in ("pre_logits", "features", "logits"):
            raise NSPluginError(f"representation must be 'pre_logits', 'features' or 'logits', got {representation!r}")
        if optimizer not in ("adam", "sgd"):
            raise NSPluginError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        _, core = self._core()
        if representation != "logits" and not (hasattr(core, "forward_features") and hasattr(core, "forward_head")):
            raise NSPluginError(f"{type(core).__name__} has no timm forward_features/forward_head; "
                                f"use representation='logits'")
        self.representation = representation
        self.steps = int(steps)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.stop_cosine = stop_cosine
        self.supported_mode = ["default"]
        if target is not None:
            self.set_target_images(target)

    def represent(self, images):
        """The representation ``f(x)`` matched by the attack, for images in [0, 1]
        (:func:`ns_plugin.anatomy.representation`)."""
        if self.representation == "logits":
            return self.get_logits(images).flatten(1)
        from ..anatomy import representation
        return representation(self._model_with_normalizer(), self.representation)(images)

    def forward(self, images, labels=None, target_images=None):
        r"""
        Overridden.
        """
        images, target = self._prepare(images, labels, target_images)
        n = len(images)
        with torch.no_grad():
            goal = self.represent(target).detach()
            start_cos = F.cosine_similarity(self.represent(images), goal, dim=1)
        from ..anatomy import match_embedding

        def reached(step, x, rep, loss):
            return self.stop_cosine is not None and n > 0 and bool(
                (F.cosine_similarity(rep, goal, dim=1) >= self.stop_cosine).all())

        x, steps = match_embedding(self.represent, images, goal, steps=self.steps, lr=self.lr,
                                   optimizer=self.optimizer, callback=reached)
        adv_images = x.clamp(0, 1)
        with torch.no_grad():
            rep = self.represent(adv_images)
            diff = (adv_images - images).flatten(1)
            self._set_info({
                "cosine": F.cosine_similarity(rep, goal, dim=1).float().cpu(),
                "cosine_start": start_cos.float().cpu(),
                "pixel_change_mean_abs": diff.abs().mean(1).float().cpu(),
                "pixel_change_linf": diff.abs().amax(1).float().cpu() if n else torch.zeros(0),
                "loss": (0.5 * (rep - goal).pow(2).sum(1)).float().cpu(),
                "steps": steps,
            })
        return adv_images
