import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NSPluginError
from ._base import NSAttack


def _attention_modules(core):
    """The self-attention modules of a timm ViT-style model, in depth order, or an error naming PatchFool."""
    from ..anatomy import attention_modules
    mods = attention_modules(core)
    pe = getattr(core, "patch_embed", None)
    if not mods or pe is None or getattr(pe, "patch_size", None) is None:
        raise NSPluginError(f"PatchFool needs a ViT with global self-attention over patch tokens (timm "
                            f"VisionTransformer/DeiT blocks with .attn); {type(core).__name__} has none. Use an "
                            f"attention-free attack (e.g. torchattacks.PGD) for this model")
    return mods


def _pcgrad(g_aux, g_main):
    """PCGrad (Yu et al., 2020) per sample: where the auxiliary gradient conflicts with the main one (negative
    cosine), remove its component along the main gradient."""
    a, b = g_aux.flatten(1), g_main.flatten(1)
    dot = (a * b).sum(1, keepdim=True)
    proj = a - dot / b.pow(2).sum(1, keepdim=True).clamp_min(1e-20) * b
    return torch.where(dot < 0, proj, a).view_as(g_aux)


class PatchFool(NSAttack):
    r"""
    Patch-Fool in the paper 'Patch-Fool: Are Vision Transformers Always Robust Against Adversarial
    Perturbations?' (Fu et al., ICLR 2022) [https://arxiv.org/abs/2203.08392]

    A ViT-specific attack that perturbs only a few whole patches (sparse over patches):

    1. attention-aware patch selection: the ``patches`` patches that receive the most attention at block
       ``select_layer`` (attention averaged over heads and over queries) are chosen per image;
    2. the chosen patches are optimised with Adam to maximise cross-entropy plus ``attn_weight`` times the
       attention-aware loss — the log-attention every query pays to the (first) chosen patch, summed over the
       blocks ``attn_layers`` — with conflicting attention gradients projected out (PCGrad) as in the paper;
    3. variants: unconstrained (``eps=None``: the patch content is free in [0, 1]), "mild" Patch-Fool with an
       l-infinity bound ``eps`` around the clean patch, and Sparse Patch-Fool (``sparse_pixels=k``: only the k
       pixels (all channels) of the chosen patches picked by a learnt mask are changed).

    The attention maps are read from timm's ``Attention`` modules without editing timm (see
    :class:`ns_plugin.anatomy.AttentionRecorder`). Models without such attention raise :class:`ns_plugin.NSPluginError`.

    Distance Measure : L0 over patches (unconstrained) / Linf within the patches (mild)

    Arguments:
        model (nn.Module): model to attack (timm ViT/DeiT, optionally ``Sequential(Normalize, ViT)``).
        patches (int): number of patches to perturb per image. (Default: 1)
        eps (float or None): l-infinity bound of the mild variant; None for the unconstrained attack. (Default: None)
        steps (int): number of Adam steps. (Default: 250)
        lr (float): Adam learning rate in pixel units (the paper's 0.22 in ImageNet-normalised units, times
            std ≈ 0.225). Decayed by ``gamma`` every 10 steps. (Default: 0.05)
        gamma (float): step decay factor of the learning rate. (Default: 0.95)
        attn_weight (float): weight of the attention-aware loss. (Default: 0.002)
        select_layer (int or None): block whose attention selects the patches; None: ``depth // 3`` (block 4 of
            12, the paper's setting). (Default: None)
        attn_layers (list or None): blocks whose attention enters the attention loss; None: blocks
            ``1 .. depth//2 - 1`` (the paper's "first half", skipping block 0; block 0 for depth < 4). (Default: None)
        sparse_pixels (int or None): Sparse Patch-Fool: number of pixels to perturb in the chosen patches.
            (Default: None)
        random_start (bool): start the unconstrained patch from uniform noise (mild: from a uniform point of
            the eps-ball) rather than the clean patch. (Default: True)

    After a call, ``atk.last_info`` holds ``patch_index`` (N, patches) and ``loss`` (final cross-entropy).

    Shape:
        - images: :math:`(N, C, H, W)` where `N = number of batches`, `C = number of channels`,
          `H = height` and `W = width`. It must have a range [0, 1].
        - labels: :math:`(N)` where each value :math:`y_i` is :math:`0 \leq y_i \leq` `number of labels`.
        - output: :math:`(N, C, H, W)`.

    Examples::
        >>> attack = torchattacks.PatchFool(model, patches=1)
        >>> adv_images = attack(images, labels)
        >>> mild = torchattacks.PatchFool(model, patches=1, eps=16/255)

    """

    def __init__(self, model, patches=1, eps=None, steps=250, lr=0.05, gamma=0.95, attn_weight=0.002,
                 select_layer=None, attn_layers=None, sparse_pixels=None, random_start=True):
        super().__init__("PatchFool", model)
        _, core = self._core()
        mods = _attention_modules(core)
        depth = len(mods)
        from ..validation import Bool, Float, Int, check_args
        a = check_args("PatchFool", patches=(patches, Int(1)), eps=(eps, Float(0, 1, lo_open=True, optional=True)),
                       steps=(steps, Int(1)), lr=(lr, Float(0, lo_open=True)), gamma=(gamma, Float(0, 1, lo_open=True)),
                       attn_weight=(attn_weight, Float(0)), select_layer=(select_layer, Int(0, optional=True)),
                       sparse_pixels=(sparse_pixels, Int(1, optional=True)), random_start=(random_start, Bool()))
        self.patches = a["patches"]
        self.eps = a["eps"]
        self.steps = a["steps"]
        self.lr = a["lr"]
        self.gamma = a["gamma"]
        self.attn_weight = a["attn_weight"]
        self.select_layer = depth // 3 if select_layer is None else int(select_layer)
        if not 0 <= self.select_layer < depth:
            raise NSPluginError(f"select_layer must be in [0, {depth - 1}] for this {depth}-block model, got {select_layer}")
        if attn_layers is None:
            attn_layers = list(range(1, depth // 2)) or [0]
        attn_layers = [int(i) for i in attn_layers]
        if any(not 0 <= i < depth for i in attn_layers):
            raise NSPluginError(f"attn_layers must be block indices in [0, {depth - 1}], got {attn_layers}")
        self.attn_layers = attn_layers
        self.sparse_pixels = None if sparse_pixels is None else int(sparse_pixels)
        self.random_start = bool(random_start)
        self.supported_mode = ["default", "targeted"]

    def _geometry(self, core, images):
        pe = core.patch_embed
        ph, pw = (pe.patch_size, pe.patch_size) if isinstance(pe.patch_size, int) else tuple(pe.patch_size)
        h, w = images.shape[-2:]
        if h % ph or w % pw:
            raise NSPluginError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        prefix = int(getattr(core, "num_prefix_tokens", 1 if getattr(core, "cls_token", None) is not None else 0))
        return ph, pw, h // ph, w // pw, prefix

    def forward(self, images, labels):
        r"""
        Overridden.
        """
        images = self._check_inputs(images)
        _, core = self._core()
        ph, pw, gh, gw, prefix = self._geometry(core, images)
        n, num_p = len(images), gh * gw
        if self.patches > num_p:
            raise NSPluginError(f"patches={self.patches} but the images have only {num_p} patches")
        if self.sparse_pixels is not None and not 1 <= self.sparse_pixels <= self.patches * ph * pw:
            raise NSPluginError(f"sparse_pixels must be in [1, {self.patches * ph * pw}], got {self.sparse_pixels}")

        from ..anatomy import AttentionRecorder
        with AttentionRecorder(core, grads=True) as rec:
            maps = rec.live
            with torch.no_grad():
                logits = self.get_logits(images)
            labels = self._check_labels(labels, n, num_classes=logits.shape[1])
            if self.targeted:
                target_labels = self.get_target_label(images, labels)
            attn = maps[self.select_layer].mean(1)  # (N, T, T), mean over heads
            score = attn.mean(1)[:, prefix:]  # attention each patch receives, averaged over queries
            patch_index = score.argsort(dim=1, descending=True)[:, :self.patches]
            rec.clear()

            mask = torch.zeros(n, 1, gh, gw, device=images.device)
            mask.view(n, -1).scatter_(1, patch_index, 1.0)
            mask = F.interpolate(mask, scale_factor=(ph, pw), mode="nearest")

            if self.eps is None:
                start = torch.rand_like(images) if self.random_start else images.clone()
            else:
                start = images + (torch.empty_like(images).uniform_(-self.eps, self.eps) if self.random_start else 0)
            delta = start.clamp(0, 1).detach().requires_grad_(True)
            params = [delta]
            pix_logit = None
            if self.sparse_pixels is not None:
                pix_logit = (torch.rand(n, 1, *images.shape[-2:], device=images.device) * mask).requires_grad_(True)
                params.append(pix_logit)
            opt = torch.optim.Adam([delta], lr=self.lr)
            mask_opt = torch.optim.Adam([pix_logit], lr=1e-2) if pix_logit is not None else None
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=self.gamma)
            query_target = patch_index[:, 0] + prefix  # the attention loss pulls attention to the first patch
            ce = nn.CrossEntropyLoss()

            for _ in range(self.steps):
                m = self._current_mask(mask, pix_logit)
                adv = images * (1 - m) + delta * m
                rec.clear()
                out = self.get_logits(adv)
                loss = -ce(out, target_labels) if self.targeted else ce(out, labels)
                grads = torch.autograd.grad(loss, params, retain_graph=self.attn_weight > 0)
                g_delta = grads[0]
                g_mask = grads[1] if pix_logit is not None else None
                if self.attn_weight > 0:
                    for li in self.attn_layers:
                        a = maps[li].mean(1)  # (N, T, T)
                        tgt = a.gather(2, query_target.view(n, 1, 1).expand(n, a.shape[1], 1))
                        a_loss = tgt.clamp_min(1e-12).log().mean()
                        ag = torch.autograd.grad(a_loss, params, retain_graph=True)
                        g_delta = g_delta + self.attn_weight * _pcgrad(ag[0], grads[0])
                        if g_mask is not None:
                            g_mask = g_mask + self.attn_weight * _pcgrad(ag[1], grads[1])
                opt.zero_grad(set_to_none=True)
                delta.grad = -g_delta  # gradient ascent on the attack objective
                opt.step()
                sched.step()
                if mask_opt is not None:
                    mask_opt.zero_grad(set_to_none=True)
                    pix_logit.grad = -g_mask
                    mask_opt.step()
                    with torch.no_grad():
                        pix_logit -= pix_logit.flatten(1).min(1).values.view(n, 1, 1, 1)
                        pix_logit += 1e-6
                        pix_logit *= mask
                with torch.no_grad():
                    if self.eps is not None:
                        delta.copy_(torch.min(torch.max(delta, images - self.eps), images + self.eps))
                    delta.clamp_(0, 1)
            rec.clear()

        m = self._current_mask(mask, pix_logit).detach()
        adv_images = (images * (1 - m) + delta.detach() * m).clamp(0, 1).detach()
        self._set_info({"patch_index": patch_index.cpu(), "loss": float(loss.detach()) if self.steps else float("nan")})
        return adv_images

    def _current_mask(self, mask, pix_logit):
        """The patch mask, or for Sparse Patch-Fool its top-k pixels (straight-through to the learnt scores)."""
        if pix_logit is None:
            return mask
        flat = pix_logit.flatten(1)
        thr = flat.topk(self.sparse_pixels, dim=1).values[:, -1:]
        hard = (flat >= thr).float().view_as(pix_logit)
        return ((hard - pix_logit).detach() + pix_logit) * mask
