"""EasyRobust integration: a ``train_one_epoch`` with the signature of EasyRobust's (and timm's) training
scripts, so such a script can train with any registered ns_plugin method by swapping one import::

    from ns_plugin import train_one_epoch   # replaces the script's own train_one_epoch (the only change)
    # the method: args.method ("ns" by default; standard / random / madry / trades / dat / dat_ns), e.g. as
    # "method: madry" in the script's own --config YAML (argparse keeps unknown YAML keys on args)
    train_metrics = train_one_epoch(epoch, model, loader_train, optimizer, train_loss_fn, args,
                                    lr_scheduler=lr_scheduler, amp_autocast=amp_autocast,
                                    loss_scaler=loss_scaler, model_ema=model_ema, mixup_fn=mixup_fn)

Method hyper-parameters are read from ``args`` when present under the :class:`TrainConfig` names
(``eps``, ``lim``, ``noise_lr``, ``noise_max_steps``, ``search``, ``steps_per_round``, ``pgd_eps``,
``trades_beta``, ``vqgan``, ``dat_eps``...), else the paper defaults. The noise (NS, arXiv:2403.10476 Alg. 1) is
searched every ``steps_per_round`` (40) batches on the current batch, on rank 0, and broadcast. The
method supplies its own cross-entropy terms (``loss_fn`` is not used; soft mixup targets work).

What the scripts feed is accepted as they produce it:

* a model taking images in [0, 1] (``Sequential(Normalize, net)``, as EasyRobust's adversarial-training
  script builds it), or a bare model fed normalised images (EasyRobust's ``base_training_script.py``) when
  the normalisation is known: ``args.mean``/``args.std`` (the scripts' ``--mean/--std``). The batch is then
  mapped back to pixels and the model run as ``Sequential(Normalize(mean, std), model)`` (same parameters),
  because the methods' noise and attacks live in pixel space;
* pixels slightly outside [0, 1] (the adversarial-training script's PCA ``Lighting`` gives -0.013...1.011)
  are clamped to [0, 1] for the method, with a warning the first time;
* the script's logging contract is kept: the ``train`` logger prints its ``Train: epoch [i/n (p%)] Loss ...
  Time ... LR ... Data ...`` line every ``args.log_interval`` batches and at the last one (rank 0).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import fields
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import NSPluginError
from ..training import trainers
from ..training.config import TrainConfig

#: the scripts' logger (``_logger = logging.getLogger('train')`` in EasyRobust's and timm's train.py)
_script_log = logging.getLogger("train")
log = logging.getLogger(__name__)
_warned: set = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)

#: TrainConfig fields a script's ``args`` may set for the method (the rest belong to the script).
METHOD_KEYS = ("eps", "lim", "noise_lr", "noise_max_steps", "search", "search_batch_size", "warm_start",
               "random_norm", "random_shrink", "stop_confirm_batches", "heldout_size", "pgd_eps", "pgd_alpha",
               "pgd_steps", "madry_clean_weight", "trades_beta",
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

    def attack_autocast(self):
        """Adversarial examples made inside the script's step (Madry, TRADES, DAT) stay fp32: the script's
        ``amp_autocast`` is fp16 (timm's NativeScaler), whose attack gradients would need a scaler."""
        import contextlib
        return contextlib.nullcontext()

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def find_noise(self, rnd, init=None):
        from ..training.loop import search_and_broadcast
        x = self.x if self.rank == 0 else None
        return search_and_broadcast(self.raw, x, self.cfg, rnd, init=init, world=self.world, rank=self.rank,
                                    device=self.device)

    def search_images(self, rnd=0):
        """The images the noise of this round is measured on: the script's current batch."""
        return self.x[: self.cfg.search_batch_size]

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
    """A validated :class:`TrainConfig` from a script's ``args``: ``args.method`` (default ``"ns"``; the
    older ``args.ns_method`` is accepted as an alias with a warning) and the :data:`METHOD_KEYS` it defines."""
    names = {f.name for f in fields(TrainConfig)}
    d: Dict[str, Any] = {k: getattr(args, k) for k in METHOD_KEYS if k in names and hasattr(args, k)}
    method, alias = getattr(args, "method", None), getattr(args, "ns_method", None)
    if alias is not None:
        if method is not None and method != alias:
            raise NSPluginError(f"args.method={method!r} and args.ns_method={alias!r} disagree; set only args.method")
        _warn_once("ns_method", "args.ns_method is an alias of args.method; set args.method = %r", alias)
    d["method"] = method or alias or "ns"
    return TrainConfig.from_dict(d).validate()


def input_space(model, args: Any) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``None`` when ``model`` takes images in [0, 1] (it starts with a normaliser), else the ``(mean, std)``
    of the normalised images the script feeds it (from ``args.mean``/``args.std``)."""
    from ..models import unwrap
    norm, _ = unwrap(model)
    if norm is not None:
        return None
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if mean is None or std is None:
        raise NSPluginError("the model has no Normalize layer, so it is fed normalised images; give their "
                            "normalisation as args.mean and args.std (the script's --mean/--std), or pass "
                            "Sequential(Normalize(mean, std), model) with images in [0, 1]")
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return m, s


def _to_pixels(x: torch.Tensor, space) -> torch.Tensor:
    if space is not None:
        m, s = space
        x = x * s.to(x) + m.to(x)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        _warn_once("clamp", "input pixels span [%.3f, %.3f] (e.g. EasyRobust's Lighting augmentation); clamping "
                   "them to [0, 1] for the ns_plugin method (warned once)", lo, hi)
        x = x.clamp(0, 1)
    return x


class _Meter:
    def __init__(self):
        self.val, self.sum, self.count, self.avg = 0.0, 0.0, 0, 0.0

    def update(self, v: float, n: int = 1) -> None:
        self.val, self.sum, self.count = v, self.sum + v * n, self.count + n
        self.avg = self.sum / max(self.count, 1)


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, lr_scheduler=None, saver=None,
                    output_dir=None, amp_autocast=suppress, loss_scaler=None, model_ema=None, mixup_fn=None):
    """EasyRobust/timm ``train_one_epoch`` drop-in running the ns_plugin method ``args.method``.

    Same arguments and return value (``OrderedDict(loss=mean loss)``) as the scripts' function:
    ``loss_scaler`` (timm ``NativeScaler``) handles AMP and ``args.clip_grad``/``args.clip_mode``;
    ``model_ema.update(model)`` after each step; ``lr_scheduler.step_update(num_updates=...)``;
    ``saver.save_recovery`` every ``args.recovery_interval`` batches; the ``train`` logger's per-step line
    every ``args.log_interval`` batches. The method object (and its noise) persists across epochs on ``args``.
    """
    from ..models import strip_parallel, wrap

    cfg = method_config(args)
    space = input_space(model, args)
    if space is None:
        run_model = model
    else:  # a bare model fed normalised images: run the method in pixel space on the same parameters
        run_model = wrap(model, space[0].flatten().tolist(), space[1].flatten().tolist())
    key = "_ns_plugin_method"
    state = getattr(args, key, None)
    if state is None or state[0] != cfg or state[3] is not model:
        ctx = _ScriptContext(run_model, optimizer, cfg, amp_autocast)
        if space is not None:
            ctx.raw = wrap(strip_parallel(model), space[0].flatten().tolist(), space[1].flatten().tolist())
        method = trainers.get(cfg.method)(cfg)
        method.setup(ctx)
        state = (cfg, ctx, method, model)
        setattr(args, key, state)
    _, ctx, method, _ = state
    ctx.opt, ctx._autocast = optimizer, amp_autocast

    model.train()
    clip = getattr(args, "clip_grad", None)
    clip_mode = getattr(args, "clip_mode", "norm")
    log_interval = int(getattr(args, "log_interval", 50) or 50)
    world = int(getattr(args, "world_size", 1) or 1)
    main_rank = int(getattr(args, "local_rank", 0) or 0) == 0
    last_idx = len(loader) - 1
    num_updates = epoch * len(loader)
    losses, batch_time, data_time = _Meter(), _Meter(), _Meter()
    end = time.time()
    for batch_idx, (x, y) in enumerate(loader):
        data_time.update(time.time() - end)
        x, y = x.to(ctx.device), y.to(ctx.device)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        x = _to_pixels(x, space)
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
        losses.update(float(loss.detach()), x.size(0))
        batch_time.update(time.time() - end)
        if main_rank and (batch_idx == last_idx or batch_idx % log_interval == 0):
            lrl = [g["lr"] for g in optimizer.param_groups]
            _script_log.info(
                "Train: {} [{:>4d}/{} ({:>3.0f}%)]  Loss: {loss.val:#.4g} ({loss.avg:#.3g})  "
                "Time: {bt.val:.3f}s, {rate:>7.2f}/s  ({bt.avg:.3f}s, {rate_avg:>7.2f}/s)  LR: {lr:.3e}  "
                "Data: {dt.val:.3f} ({dt.avg:.3f})".format(
                    epoch, batch_idx, len(loader), 100.0 * batch_idx / max(last_idx, 1), loss=losses, bt=batch_time,
                    rate=x.size(0) * world / max(batch_time.val, 1e-9),
                    rate_avg=x.size(0) * world / max(batch_time.avg, 1e-9), lr=sum(lrl) / len(lrl), dt=data_time))
        interval = getattr(args, "recovery_interval", 0)
        if saver is not None and interval and (batch_idx == last_idx or (batch_idx + 1) % interval == 0):
            saver.save_recovery(epoch, batch_idx=batch_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        end = time.time()
    return OrderedDict([("loss", losses.avg)])
