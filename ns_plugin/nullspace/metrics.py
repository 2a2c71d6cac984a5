"""Metrics of a nullspace noise: the MSE probability of Algorithm 1 line 8 ("Approximate Nullspace Augmented
Finetuning for Robust Vision Transformers") -- the ONE implementation, used by the search, the trainer and the
EasyRobust entry -- and the quality of a learnt noise on held-out images with the permuted-noise control
(Fig. 3 of that paper; "Nullspace of Vision Transformers and what does it tell us?", Fig. 2).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..errors import NSPluginError
from ._common import _check_input_noise, _device, _level_of, frozen, permuted

__all__ = ["mse_prob", "logit_loss", "mse_probability", "noise_quality"]


def mse_prob(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Alg. 1 line 8: batch mean of the summed squared softmax difference ("MSE probability")."""
    return (noisy.float().softmax(-1) - clean.float().softmax(-1)).pow(2).sum(-1).mean()


def logit_loss(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Alg. 1 line 12: batch mean of the squared l2 distance of the logits."""
    return (noisy.float() - clean.float()).pow(2).sum(-1).mean()



def _noisy_logits(net: nn.Module, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    from ..anatomy import inject_noise
    if noise.dim() == 4:
        return net(x + noise)
    with inject_noise(net, noise):
        return net(x)


def _validate_noise(net: nn.Module, noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from ..anatomy import check_noise
    level = _level_of(noise)
    if level == "encoder":
        check_noise(net, noise)
    else:
        _check_input_noise(net, noise, x.shape[1:])
    return noise.detach().to(_device(net), torch.float32)


def _eval_logits(net, x, noises, batch_size):
    """Clean logits and the logits under each noise in ``noises``, batched, without autograd."""
    dev = _device(net)
    clean, noisy = [], [[] for _ in noises]
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            clean.append(net(xb).float().cpu())
            for k, v in enumerate(noises):
                noisy[k].append(_noisy_logits(net, xb, v).float().cpu())
    return torch.cat(clean), [torch.cat(n) for n in noisy]


def mse_probability(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, *, batch_size: int = 256) -> float:
    """MSE probability of ``noise`` on images ``x``: mean over images of
    ``||softmax(f(u + v)) - softmax(f(u))||^2`` (arXiv:2403.10476, Alg. 1 line 8; Fig. 3 and 5).  ``noise`` is
    encoder-level ``(1, N_patches, D)`` or input-level ``(1, C, H, W)``.  Computed in eval mode."""
    from ..models import strip_parallel
    from ..models import check_images
    net = strip_parallel(model)
    check_images(x, net)
    v = _validate_noise(net, noise, x)
    with frozen(net):
        clean, (noisy,) = _eval_logits(net, x, [v], batch_size)
    return float(mse_prob(noisy, clean))


def noise_quality(model: nn.Module, noise: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                  generator=None, batch_size: int = 256) -> Dict[str, float]:
    """Quality of a learnt noise on held-out images (arXiv:2403.10476 Fig. 3(a), OpenReview:d8VrVfNARSy Fig. 2).

    Returns ``n``, ``norm``, ``pred_match`` (% of images whose predicted class is unchanged by the noise),
    ``mse_prob``, the permuted-noise control (``permuted_pred_match``, ``permuted_mse_prob``: same values at
    shuffled positions, drawn with ``generator``) and, when labels ``y`` are given, ``clean_acc``,
    ``noisy_acc`` and ``permuted_acc`` (%)."""
    from ..models import strip_parallel
    from ..models import check_images
    net = strip_parallel(model)
    check_images(x, net)
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        raise NSPluginError(f"labels must be a tensor with one label per image ({len(x)}), "
                            f"got {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    v = _validate_noise(net, noise, x)
    vp = permuted(v, generator=generator)
    with frozen(net):
        clean, (noisy, perm) = _eval_logits(net, x, [v, vp], batch_size)
    pc, pn, pp = clean.argmax(1), noisy.argmax(1), perm.argmax(1)
    out = dict(n=int(len(x)), norm=float(v.norm()),
               pred_match=100.0 * float((pn == pc).float().mean()), mse_prob=float(mse_prob(noisy, clean)),
               permuted_pred_match=100.0 * float((pp == pc).float().mean()),
               permuted_mse_prob=float(mse_prob(perm, clean)))
    if y is not None:
        y = y.cpu()
        out.update(clean_acc=100.0 * float((pc == y).float().mean()), noisy_acc=100.0 * float((pn == y).float().mean()),
                   permuted_acc=100.0 * float((pp == y).float().mean()))
    return out
