"""Anatomy of a ViT: where the encoder-level nullspace noise goes.

The ε-approximate nullspace noise of the NS-ViT paper (arXiv:2403.10476, §3.2-3.3, Eq. 3-8, Algorithm 1 line 7)
is one tensor ``v`` of shape ``(1, N_patches, D)``, broadcast over the batch and added to the output
of the patch embedding ``U = f_e(X)``: ``Z' = f_psi(f_phi^0(U + [v]))``.  As in the reference code, it is
added *before* the cls (and distillation) token is prepended and before the position embedding, so the
cls token is never perturbed.

Two ways in, both anchored on timm's own seams instead of a re-implemented forward:

* :func:`inject_noise` -- a context manager that registers a forward hook on ``patch_embed``; inside it a
  plain ``model(x)`` gives the noisy logits (DDP, train mode and gradients included).  Works for any
  model with a timm-style ``patch_embed`` module (ViT, DeiT, BEiT, EVA, Swin...).
* :class:`ViTAnatomy` -- splits a timm ``VisionTransformer`` (DeiT distilled included) into
  ``embed(x)`` (normalise + patch embedding), ``encode(tokens)`` (``_pos_embed``, ``patch_drop``,
  ``norm_pre``, ``blocks``, ``norm``) and ``head(feats)`` (``forward_head``), so that the patch
  embedding of a batch can be computed once and shared between the clean and the noisy pass.

Models without a ``patch_embed`` (CNNs...) have no encoder-level token space; for them use the
input-level variant :func:`ns_plugin.nullspace.search.search_input_noise` (OpenReview:d8VrVfNARSy, §5.3).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from .errors import NSPluginError

_INPUT_LEVEL_HINT = ("encoder-level noise needs a ViT-style `patch_embed` (timm VisionTransformer/DeiT); "
                     "use the input-level variant ns_plugin.nullspace.search.search_input_noise instead")


def _core(model: nn.Module) -> Tuple[Optional[nn.Module], nn.Module]:
    from .models import unwrap
    if not isinstance(model, nn.Module):
        raise NSPluginError(f"expected a torch.nn.Module model, got {type(model).__name__}")
    return unwrap(model)


def patch_embed_of(model: nn.Module) -> nn.Module:
    """The timm ``patch_embed`` module of ``model`` (through ``Normalize`` and DDP wrappers)."""
    _, core = _core(model)
    pe = getattr(core, "patch_embed", None)
    if not isinstance(pe, nn.Module):
        raise NSPluginError(f"{type(core).__name__} has no patch embedding: {_INPUT_LEVEL_HINT}")
    return pe


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def token_shape(model: nn.Module) -> Tuple[int, int]:
    """``(N_patches, D)``: the shape (without the batch dimension) of the patch-embedding output, i.e. of
    the encoder-level noise (arXiv:2403.10476, Alg. 1 line 7; 1x196x768 for ViT-B/16 at 224)."""
    pe = patch_embed_of(model)
    n = getattr(pe, "num_patches", None)
    proj = getattr(pe, "proj", None)
    d = proj.out_channels if isinstance(proj, nn.Conv2d) else None
    if d is None:
        _, core = _core(model)
        d = getattr(core, "embed_dim", None) or getattr(core, "num_features", None)
    if n and d and not getattr(pe, "dynamic_img_size", False):
        return int(n), int(d)
    # fall back to one dummy forward of the patch embedding alone
    from .models import input_size
    size = input_size(model)
    if size is None:
        raise NSPluginError(f"cannot tell the token shape of {type(_core(model)[1]).__name__}: its patch "
                            f"embedding has no fixed image size; build the model with a fixed img_size")
    dev, dt = _param_device_dtype(pe)
    with torch.no_grad():
        out = pe(torch.zeros(1, *size, device=dev, dtype=dt))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 4:  # NHWC
        return int(out.shape[1] * out.shape[2]), int(out.shape[3])
    if out.dim() == 3:
        return int(out.shape[1]), int(out.shape[2])
    raise NSPluginError(f"patch embedding of {type(_core(model)[1]).__name__} returns a {out.dim()}-D tensor; "
                        f"{_INPUT_LEVEL_HINT}")


def check_noise(model: nn.Module, noise: torch.Tensor, *, what: str = "noise") -> Tuple[int, int]:
    """Raise :class:`NSPluginError` unless ``noise`` is a finite ``(1, N_patches, D)`` tensor for ``model``."""
    want = token_shape(model)
    if not isinstance(noise, torch.Tensor):
        raise NSPluginError(f"{what} must be a tensor of shape (1, {want[0]}, {want[1]}), got {type(noise).__name__}")
    if tuple(noise.shape) != (1, *want):
        raise NSPluginError(f"{what} has shape {tuple(noise.shape)} but this model's encoder-level noise must be "
                            f"(1, {want[0]}, {want[1]}) = (1, N_patches, D)")
    if not noise.is_floating_point():
        raise NSPluginError(f"{what} must be a floating-point tensor, got {noise.dtype}")
    if not bool(torch.isfinite(noise.detach()).all()):
        raise NSPluginError(f"{what} contains NaN or inf values; pass a finite noise tensor")
    return want


def _add(out, noise: torch.Tensor):
    if isinstance(out, (tuple, list)):  # e.g. dynamic-size patch embeds returning (x, feat_size)
        return type(out)([_add(out[0], noise), *out[1:]])
    v = noise.to(device=out.device, dtype=out.dtype)
    if out.dim() == 4:  # NHWC token grid (dynamic_img_size ViTs, Swin)
        b, h, w, d = out.shape
        return out + v.reshape(1, h, w, d)
    return out + v


@contextlib.contextmanager
def inject_noise(model: nn.Module, noise: Optional[torch.Tensor]) -> Iterator[nn.Module]:
    """Add ``noise`` (``(1, N_patches, D)``, broadcast over the batch) to the patch-embedding output of
    ``model`` while the ``with`` block runs (arXiv:2403.10476, Alg. 1 line 7: ``f_psi(f_phi^0(U + [v]))``).

    The noise enters *after* ``patch_embed`` and *before* the cls/dist token is prepended and the position
    embedding added, so the cls token is never perturbed.  Inside the block a plain ``model(x)`` returns the
    noisy logits -- also for DDP-wrapped models, in train mode, with gradients reaching both the model
    parameters and ``noise``.  ``noise=None`` is a no-op.  The hook is removed on exit, also on exceptions.

    >>> with inject_noise(model, v):
    ...     noisy_logits = model(x)
    """
    if noise is None:
        yield model
        return
    check_noise(model, noise)
    pe = patch_embed_of(model)
    handle = pe.register_forward_hook(lambda mod, inp, out: _add(out, noise))
    try:
        yield model
    finally:
        handle.remove()


class ViTAnatomy(nn.Module):
    """``model(x) == head(encode(embed(x)))`` for a timm ``VisionTransformer`` (wrapped or not in
    ``Sequential(Normalize, net)`` / DDP), with the encoder-level noise entering between ``embed`` and
    ``encode`` (arXiv:2403.10476, Eq. 7: ``f_psi(f_phi^0(u + v))`` with ``u = f_e(x)``).

    * ``embed(x)``: images in [0, 1] -> normalise -> ``patch_embed`` -> tokens ``(N, N_patches, D)``.
    * ``encode(tokens, noise=None)``: ``tokens + noise`` -> ``_pos_embed`` (prepends cls/dist tokens, adds the
      position embedding) -> ``patch_drop`` -> ``norm_pre`` -> ``blocks`` -> ``norm``.
    * ``head(feats)``: timm's ``forward_head`` (cls/avg pooling, DeiT's averaged two heads in eval mode).

    DeiT distilled models and models without a cls token (``class_token=False, global_pool='avg'``) work
    since everything goes through timm's own methods.  The anatomy shares the modules of ``model``
    (no copy), so inside an :func:`inject_noise` block ``embed`` already includes that noise.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from .models import strip_parallel
        norm, core = _core(strip_parallel(model))
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:  # pragma: no cover - timm is a hard dependency
            VisionTransformer = ()
        if not hasattr(core, "patch_embed"):
            raise NSPluginError(f"{type(core).__name__} has no patch embedding: {_INPUT_LEVEL_HINT}")
        if not isinstance(core, VisionTransformer):
            raise NSPluginError(f"the embed/encode/head split supports timm VisionTransformer models (ViT, DeiT), "
                                f"not {type(core).__name__}; use inject_noise(model, noise) for its patch_embed "
                                f"or the input-level variant search_input_noise")
        self.normalize = norm
        self.core = core
        self.token_shape = token_shape(core)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.core, "num_prefix_tokens", 0))

    @property
    def has_class_token(self) -> bool:
        return getattr(self.core, "cls_token", None) is not None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise images in [0, 1] and apply the patch embedding ``f_e`` (Alg. 1 line 6)."""
        if self.normalize is not None:
            x = self.normalize(x)
        return self.core.patch_embed(x)

    def encode(self, tokens: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder ``f_phi`` on patch tokens (plus the encoder-level ``noise`` if given), timm's seams."""
        c = self.core
        if noise is not None:
            tokens = _add(tokens, noise)
        x = c._pos_embed(tokens)
        x = c.patch_drop(x)
        x = c.norm_pre(x)
        if getattr(c, "grad_checkpointing", False) and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq
            x = checkpoint_seq(c.blocks, x)
        else:
            x = c.blocks(x)
        return c.norm(x)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Classifier ``f_psi`` (timm ``forward_head``)."""
        return self.core.forward_head(feats)

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.encode(self.embed(x), noise))


def anatomy(model: nn.Module) -> ViTAnatomy:
    """:class:`ViTAnatomy` of ``model`` (raises :class:`NSPluginError` for models it cannot split)."""
    return ViTAnatomy(model)


# ----------------------------------------------------------------------------------------------------------
# representations and embedding matching ("Intriguing Equivalence Structures of the Embedding Space of Vision
# Transformers", arXiv:2401.15568, Eq. 3-4)
# ----------------------------------------------------------------------------------------------------------
#: What :func:`representation` can return.
REPRESENTATIONS = ("cls", "features", "pre_logits", "logits")


def representation(model: nn.Module, kind: str = "pre_logits", *, dtype: Optional[torch.dtype] = None):
    """``f(x) -> (N, n)`` for images ``x`` in [0, 1] of shape ``(N, C, H, W)``: the one way ns_plugin reads a
    model's representation.

    ``kind``: ``"cls"`` (token 0 of timm's ``forward_features``, after the final norm), ``"features"`` (all
    final tokens, flattened), ``"pre_logits"`` (``forward_head(..., pre_logits=True)``: what the classifier
    reads) or ``"logits"``. ``model`` is ``Sequential(Normalize, timm ViT)`` or a bare timm model; ``logits``
    works for any classifier. ``dtype``: run an eval-mode copy of the model in this dtype (e.g. float64 for
    Jacobians); ``None`` uses the model as it is.
    """
    import copy

    if kind not in REPRESENTATIONS:
        raise NSPluginError(f"kind must be one of {', '.join(REPRESENTATIONS)}, got {kind!r}")
    m = copy.deepcopy(model).to(dtype).eval() if dtype is not None else model
    norm, core = _core(m)
    if kind != "logits" and not (hasattr(core, "forward_features") and hasattr(core, "forward_head")):
        raise NSPluginError(f"{type(core).__name__} has no forward_features/forward_head (timm models do); "
                            f"use kind='logits' or pass your own function")

    def f(x: torch.Tensor) -> torch.Tensor:
        if dtype is not None:
            x = x.to(dtype)
        if kind == "logits":
            return m(x)
        z = norm(x) if norm is not None else x
        feats = core.forward_features(z)
        if kind == "cls":
            return feats[:, 0] if feats.dim() == 3 else feats.flatten(1)
        if kind == "features":
            return feats.flatten(1)
        return core.forward_head(feats, pre_logits=True).flatten(1)

    f.model = m  # type: ignore[attr-defined]
    f.kind = kind  # type: ignore[attr-defined]
    return f


def match_embedding(f, x: torch.Tensor, goal: torch.Tensor, *, steps: int, lr: float, optimizer: str = "sgd",
                    clamp: bool = True, callback=None) -> Tuple[torch.Tensor, int]:
    """Embedding matching (arXiv:2401.15568 Eq. 3-4): descend ``L(x) = 1/2 ||f(x) - goal||^2`` (per image,
    summed over the batch) from ``x`` with ``optimizer`` (``"sgd"``: plain gradient descent as in the paper,
    or ``"adam"``), keeping ``x`` in [0, 1] when ``clamp``.

    ``callback(step, x, emb, loss_per_image)`` is called before each update and after the last one (step 0 ..
    ``steps``); returning True stops there. Returns ``(x, updates made)``. The one implementation behind
    :class:`ns_plugin.attacks.EmbeddingMatch` and :func:`ns_plugin.analysis.jacobian.embedding_matching`.
    """
    if optimizer not in ("sgd", "adam"):
        raise NSPluginError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    x = x.detach().clone().requires_grad_(True)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([x], lr=lr)
    step = 0
    for step in range(int(steps) + 1):
        emb = f(x)
        per_image = 0.5 * (emb - goal).pow(2).flatten(1).sum(1)
        if (callback is not None and callback(step, x.detach(), emb.detach(), per_image.detach())) or step == steps:
            break
        opt.zero_grad(set_to_none=True)
        per_image.sum().backward()
        opt.step()
        if clamp:
            with torch.no_grad():
                x.clamp_(0, 1)
    return x.detach(), step


# ----------------------------------------------------------------------------------------------------------
# attention capture
# ----------------------------------------------------------------------------------------------------------
def attention_modules(model: nn.Module) -> List[nn.Module]:
    """The timm ``Attention`` modules of a ViT-style model (blocks with ``attn.attn_drop`` and
    ``attn.fused_attn``), in depth order; ``[]`` when it has none."""
    _, core = _core(model)
    mods = []
    for blk in getattr(core, "blocks", None) or []:
        attn = getattr(blk, "attn", None)
        if attn is not None and hasattr(attn, "attn_drop") and hasattr(attn, "fused_attn"):
            mods.append(attn)
    return mods


class AttentionRecorder:
    """Context manager recording every block's attention probabilities ``(B, heads, N, N)`` in forward order:
    the one attention capture of ns_plugin (PatchFool, saliency maps).

    timm 1.x computes attention with the fused ``scaled_dot_product_attention`` kernel by default, which never
    materialises the probabilities; inside this context each ``Attention`` runs its explicit (mathematically
    equal) path and a forward hook on its ``attn_drop`` reads the softmax output. timm's files are not touched
    and the ``fused_attn`` flags are restored on exit. ``attn`` holds detached maps; with ``grads=True``
    ``live`` holds them in the graph (for attention losses and :meth:`gradients`). :meth:`clear` empties both.

    Example::

        with AttentionRecorder(model, grads=True) as rec:
            logits = model(x.requires_grad_())
            grads = rec.gradients(logits[:, c].sum())
        rec.attn, rec.grad   # lists, one tensor per block
    """

    def __init__(self, model: nn.Module, *, grads: bool = False):
        self.modules = attention_modules(model)
        if not self.modules:
            raise NSPluginError(f"{type(_core(model)[1]).__name__} has no timm Attention blocks (`attn.fused_attn` "
                                f"and `attn.attn_drop`); attention maps need a ViT-style model")
        self.grads = grads
        self.attn: List[torch.Tensor] = []
        self.live: List[torch.Tensor] = []
        self.grad: List[torch.Tensor] = []
        self._handles: list = []
        self._flags: list = []

    def __enter__(self) -> "AttentionRecorder":
        for a in self.modules:
            self._flags.append((a, a.fused_attn))
            a.fused_attn = False
            self._handles.append(a.attn_drop.register_forward_hook(self._hook))
        return self

    def _hook(self, mod, inp, out) -> None:
        probs = inp[0]  # the softmax output, before attention dropout
        self.attn.append(probs.detach())
        if self.grads:
            self.live.append(probs)

    def clear(self) -> None:
        self.attn.clear()
        self.live.clear()

    def gradients(self, score: torch.Tensor) -> List[torch.Tensor]:
        """Gradients of the scalar ``score`` w.r.t. every recorded attention map (``grads=True``), computed
        with ``torch.autograd.grad`` so nothing accumulates in the model's ``.grad``."""
        if not self.grads:
            raise NSPluginError("AttentionRecorder(grads=True) is needed for gradients")
        if not all(t.requires_grad for t in self.live):
            raise NSPluginError("the attention maps do not require grad; run the forward with grad enabled on "
                                "an input that requires grad")
        self.grad = [g.detach() for g in torch.autograd.grad(score, self.live)]
        return self.grad

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for a, flag in self._flags:
            a.fused_attn = flag
        self._handles, self._flags = [], []
