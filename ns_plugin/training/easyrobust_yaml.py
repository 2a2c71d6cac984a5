"""EasyRobust (timm) training YAML files for ``ns-plugin train --config``.

EasyRobust's training scripts (timm's ``train.py`` argument set) read a YAML mapping of their argparse
options (``model``, ``lr``, ``epochs``, ``batch_size``, ``opt``, ``weight_decay``, ``warmup_epochs``,
``workers``, ``output``, ...). :func:`translate` turns such a mapping into :class:`TrainConfig` keys:

* keys that mean the same here are renamed (:data:`RENAMED`); ``epochs: E`` becomes ``rounds: E``: one
  round (our checkpoint/log boundary, ``steps_per_round`` model steps, 40 by default as in the paper's
  Algorithm 1) per epoch;
* option values we implement are checked (``opt: adamw`` only, ``sched: cosine|constant``,
  ``warmup_epochs: 0``...);
* ``workers`` (DataLoader decoding processes) means the same here and is kept;
* keys that only steer the script's own machinery and change no result here (``pin_mem``,
  ``log_interval``...) are dropped (:data:`NO_EFFECT`);
* every other EasyRobust key (mixup, label smoothing, RandAugment, layer decay, SGD...) has no counterpart
  in nullspace fine-tuning: refused with the mapping, or, with ``ignore_unsupported=True`` (``ns-plugin
  train --ignore-unsupported``), dropped and listed once in a warning;
* a key that is neither ours nor an EasyRobust option (a typo) is always refused, with the closest name.

``method`` is the one method key; ``ns_method`` (the name an earlier ``train_one_epoch`` read) is accepted
as an alias with a message.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Tuple

from ..errors import NSPluginError

log = logging.getLogger(__name__)

#: EasyRobust/timm key -> TrainConfig key
RENAMED = {"epochs": "rounds", "initial_checkpoint": "checkpoint", "data_dir": "data", "img_size": "image_size",
           "ns_method": "method"}
#: EasyRobust keys that change nothing in what ns_plugin trains (data loading, logging, bookkeeping)
NO_EFFECT = {"pin_mem", "log_interval", "experiment", "checkpoint_hist", "recovery_interval",
             "eval_metric", "log_wandb", "local_rank", "save_images", "no_ddp_bb", "use_multi_epochs_loader",
             "worker_seeding", "dist_bn", "channels_last", "native_amp", "apex_amp", "torchscript",
             "model_ema_force_cpu", "tta", "dataset_download", "class_map", "train_split", "val_split",
             "crop_pct", "interpolation", "no_resume_opt", "resume", "start_epoch", "opt_eps", "opt_betas",
             "momentum", "dataset"}
#: the other options of EasyRobust's training scripts (timm's train.py argument set): known, but with no
#: counterpart in nullspace fine-tuning (refused unless ignore_unsupported)
EASYROBUST_ONLY = {
    "aa", "attack_criterion", "aug_repeats", "aug_splits", "bce_loss", "bce_target_thresh", "bn_eps", "bn_momentum",
    "bn_tf", "color_jitter", "cooldown_epochs", "cutmix_minmax", "decay_epochs", "decay_milestones", "decay_rate",
    "drop", "drop_block", "drop_connect", "drop_path", "gp", "hflip", "input_size", "jsd_loss", "layer_decay",
    "lr_cycle_decay", "lr_cycle_limit", "lr_cycle_mul", "lr_k_decay", "lr_noise", "lr_noise_pct", "lr_noise_std",
    "mean", "std", "min_lr", "mixup_mode", "mixup_off_epoch", "mixup_prob", "mixup_switch_prob", "no_aug",
    "no_standard_aug", "patience_epochs", "ratio", "recount", "remode", "reprob", "resplit", "scale", "split_bn",
    "sync_bn", "train_interpolation", "vflip", "warmup_lr", "adv", "adv_eps", "adv_steps"}
#: value checks for EasyRobust keys whose only accepted values are what we implement
ACCEPTED_VALUES = {
    "opt": ({"adamw"}, "ns_plugin fine-tunes with AdamW (the paper's optimizer)"),
    "warmup_epochs": ({0}, "ns_plugin's schedules have no warm-up"),
    "smoothing": ({0, 0.0}, "no label smoothing in the ns_plugin methods"),
    "mixup": ({0, 0.0}, "no mixup in `ns-plugin train` (use train_one_epoch in the EasyRobust script for it)"),
    "cutmix": ({0, 0.0}, "no cutmix in `ns-plugin train`"),
    "clip_mode": ({"norm"}, "gradient clipping is by norm"),
}


def translate(d: Dict[str, Any], known: set, *, ignore_unsupported: bool = False,
              source: str = "config") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(our_keys, extras)`` from a YAML mapping with EasyRobust and/or ns_plugin keys (dashes already
    normalised to underscores). ``extras`` holds script-level values (``output``) for the CLI."""
    out: Dict[str, Any] = {}
    extras: Dict[str, Any] = {}
    dropped = []
    unsupported = []
    for k, v in d.items():
        if k in known and k not in RENAMED:
            target = k
        elif k in RENAMED:
            target = RENAMED[k]
            if k == "ns_method":
                log.warning("%s: 'ns_method' is an alias of 'method'; write 'method: %s'", source, v)
        elif k == "output":
            extras["out"] = v
            continue
        elif k in ACCEPTED_VALUES:
            ok, why = ACCEPTED_VALUES[k]
            if (v.lower() if isinstance(v, str) else v) in ok:
                continue
            unsupported.append(f"{k}={v!r} ({why})")
            continue
        elif k in NO_EFFECT:
            dropped.append(k)
            continue
        elif k in EASYROBUST_ONLY:
            unsupported.append(f"{k}={v!r}")
            continue
        else:
            import difflib
            close = difflib.get_close_matches(k, sorted(known | set(RENAMED)), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise NSPluginError(f"{source} has unknown key(s) [{k!r}]{hint} (neither an ns_plugin key nor an "
                                f"EasyRobust training option); known keys: {', '.join(sorted(known))}")
        if target in out:
            raise NSPluginError(f"{source} sets {target!r} twice (as {k!r} and as {target!r}); keep one")
        out[target] = v
    if unsupported:
        if not ignore_unsupported:
            mapping = ", ".join(f"{a}->{b}" for a, b in RENAMED.items() if a != "ns_method")
            raise NSPluginError(
                f"{source}: no ns_plugin counterpart for {'; '.join(unsupported)}. EasyRobust keys that map: "
                f"{mapping}, output->--out, and same-named keys (model, lr, batch_size, weight_decay, sched, "
                f"clip_grad, model_ema, seed, amp, num_classes, pretrained...); remove the others or pass "
                f"--ignore-unsupported")
        log.warning("%s: ignoring keys without an ns_plugin counterpart: %s", source, "; ".join(unsupported))
    if dropped:
        log.info("%s: keys of the EasyRobust script that change nothing here, dropped: %s", source,
                 ", ".join(dropped))
    return out, extras
