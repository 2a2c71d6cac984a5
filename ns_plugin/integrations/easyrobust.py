"""EasyRobust integration: a ``train_one_epoch`` with the signature of EasyRobust's (and timm's) training
scripts, so such a script can train with any registered ns_plugin method by swapping one import::

    from ns_plugin.integrations.easyrobust import train_one_epoch   # or ns_plugin.train_one_epoch
    args.ns_method = "ns"            # or standard / random / madry / trades / dat / dat_ns
    train_metrics = train_one_epoch(epoch, model, loader_train, optimizer, train_loss_fn, args,
                                    lr_scheduler=lr_scheduler, amp_autocast=amp_autocast,
                                    loss_scaler=loss_scaler, model_ema=model_ema, mixup_fn=mixup_fn)

Method hyper-parameters are read from ``args`` when present under the :class:`TrainConfig` names
(``eps``, ``lim``, ``noise_lr``, ``noise_max_steps``, ``search``, ``steps_per_round``, ``pgd_eps``,
``trades_beta``, ``vqgan``, ``dat_eps``...), else the paper defaults. The noise (NS, arXiv:2403.10476 Alg. 1) is
searched every ``steps_per_round`` (40) batches on the current batch, on rank 0, and broadcast. The
method supplies its own cross-entropy terms (``loss_fn`` is not used; soft mixup targets work).
The model is expected to take images in [0, 1] (``Sequential(Normalize, net)``, as EasyRobust builds it).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import suppress
from dataclasses import fields
from typing import Any, Dict, Optional

import torch

from ..training import trainers
from ..training.config import TrainConfig

#: TrainConfig fields a script's ``args`` may set for the method (the rest belong to the script).
METHOD_KEYS = ("eps", "lim", "noise_lr", "noise_max_steps", "search", "search_batch_size", "warm_start",
               "random_norm", "pgd_eps", "pgd_alpha", "pgd_steps", "madry_clean_weight", "trades_beta",
               "vqgan", "vqgan_seed", "dat_eps", "dat_steps", "dat_lr", "dat_random_start_prob",
               "steps_per_round", "seed")


class _ScriptContext:
    """What a :class:`~ns_plugin.training.methods.Method` needs from a trainer, for a foreign script."""

    def __init__(self, model, optimizer, cfg: TrainConfig, amp_autocast):
        import torch.distributed as dist

        from ..models import strip_parallel, unwrap

        self.model = model
        self.raw = strip_parallel(model)
        self.cfg = cfg
        self.opt = optimizer
        self.device = next(self.raw.parameters()).device
        self._autocast = amp_autocast
        self.dist = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.dist else 1
        self.rank = dist.get_rank() if self.dist else 0
        self.x: Optional[torch.Tensor] = None
        unwrap(model)  # fails early for odd wrappers

    def autocast(self):
        return self._autocast()

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def find_noise(self, rnd, init=None):
        from ..training.loop import search_and_broadcast
        x = self.x if self.rank == 0 else None
        return search_and_broadcast(self.raw, x, self.cfg, rnd, init=init, world=self.world, rank=self.rank,
                                    device=self.device)

    @torch.no_grad()
    def mse_prob(self, noise, rnd=0):
        from ..anatomy import inject_noise
        from ..nullspace.metrics import mse_prob
        was = self.raw.training
        self.raw.eval()
        try:
            x = self.x[: self.cfg.search_batch_size]
            clean = self.raw(x)
            with inject_noise(self.raw, noise):
                noisy = self.raw(x)
        finally:
            self.raw.train(was)
        return float(mse_prob(noisy, clean))


def method_config(args: Any) -> TrainConfig:
    """A validated :class:`TrainConfig` from a script's ``args``: ``args.ns_method`` (or ``args.method``)
    and the :data:`METHOD_KEYS` it defines."""
    names = {f.name for f in fields(TrainConfig)}
    d: Dict[str, Any] = {k: getattr(args, k) for k in METHOD_KEYS if k in names and hasattr(args, k)}
    d["method"] = getattr(args, "ns_method", None) or getattr(args, "method", None) or "ns"
    return TrainConfig.from_dict(d).validate()


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, lr_scheduler=None, saver=None,
                    output_dir=None, amp_autocast=suppress, loss_scaler=None, model_ema=None, mixup_fn=None):
    """EasyRobust/timm ``train_one_epoch`` drop-in running the ns_plugin method ``args.ns_method``.

    Same arguments and return value (``OrderedDict(loss=mean loss)``) as the scripts' function:
    ``loss_scaler`` (timm ``NativeScaler``) handles AMP and ``args.clip_grad``/``args.clip_mode``;
    ``model_ema.update(model)`` after each step; ``lr_scheduler.step_update(num_updates=...)``;
    ``saver.save_recovery`` every ``args.recovery_interval`` batches. The method object (and its noise)
    persists across epochs on ``args``.
    """
    cfg = method_config(args)
    key = "_ns_plugin_method"
    state = getattr(args, key, None)
    if state is None or state[0] != cfg:
        ctx = _ScriptContext(model, optimizer, cfg, amp_autocast)
        method = trainers.get(cfg.method)(cfg)
        method.setup(ctx)
        state = (cfg, ctx, method)
        setattr(args, key, state)
    _, ctx, method = state
    ctx.model, ctx.opt, ctx._autocast = model, optimizer, amp_autocast

    model.train()
    clip = getattr(args, "clip_grad", None)
    clip_mode = getattr(args, "clip_mode", "norm")
    steps_per_epoch = len(loader)
    num_updates = epoch * steps_per_epoch
    total, count = 0.0, 0
    for batch_idx, (x, y) in enumerate(loader):
        x, y = x.to(ctx.device), y.to(ctx.device)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        ctx.x = x
        if method.uses_noise and (num_updates % cfg.steps_per_round == 0 or getattr(method, "noise", None) is None):
            method.begin_round(ctx, num_updates // cfg.steps_per_round)
        loss, _ = method.loss(ctx, x, y)
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip, clip_mode=clip_mode, parameters=model.parameters())
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(model)
        num_updates += 1
        total += float(loss.detach()) * x.size(0)
        count += x.size(0)
        interval = getattr(args, "recovery_interval", 0)
        if saver is not None and interval and (batch_idx + 1) % interval == 0:
            saver.save_recovery(epoch, batch_idx=batch_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=total / max(count, 1))
    return OrderedDict([("loss", total / max(count, 1))])
