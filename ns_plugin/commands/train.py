"""``ns-plugin train``: fine-tune with a registered method (arXiv:2403.10476 Alg. 1 and the baselines).

``ns-plugin train --config FILE [--method NAME] [--out DIR] [--resume] [--<any config key> VALUE]``.
Precedence as in EasyRobust's ``train.py``: flag > YAML file > built-in default. ``DIR`` receives a
resumable ``last.pth`` (every round), the final safe ``model.pth``, ``log.csv``/``log.json`` and
``fig4.png``. Under ``torchrun --nproc_per_node N -m ns_plugin train ...`` it trains with DDP.
"""
from __future__ import annotations

import argparse
import json

HELP = "fine-tune a model with ns / standard / random / random_norm / madry / trades / dat / dat_ns (EasyRobust-style config)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.config import add_config_arguments

    from ..validation import PathCheck, argtype
    p.add_argument("-c", "--config", metavar="FILE",
                   type=argtype(PathCheck("file"), "--config"), help="YAML file of option: value (see benchmarks/configs/)")
    p.add_argument("--out", metavar="DIR",
                   type=argtype(PathCheck("out_dir"), "--out"), help="output folder (default: runs/<method>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pth")
    p.add_argument("--list-methods", action="store_true", help="list the registered methods and exit")
    p.add_argument("--ignore-unsupported", action="store_true",
                   help="drop (and list once) EasyRobust YAML keys that have no ns_plugin counterpart instead of "
                        "refusing the file")
    g = p.add_argument_group("config keys (override the YAML file)")
    add_config_arguments(g)
    for a in g._group_actions:
        a.default = argparse.SUPPRESS


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ..training.config import TrainConfig, read_yaml

    if args.list_methods:
        from ..training import trainers
        for name, doc in trainers.describe().items():
            print(f"{name:10s} {doc}")
        return 0
    extras: dict = {}
    d = read_yaml(args.config, ignore_unsupported=args.ignore_unsupported, extras=extras) if args.config else {}
    names = {f.name for f in fields(TrainConfig)}
    d.update({k: v for k, v in vars(args).items() if k in names})
    cfg = TrainConfig.from_dict(d).validate()
    out = args.out or extras.get("out") or f"runs/{cfg.method}"

    from ..training.loop import train

    try:
        summary = train(cfg, out, resume=args.resume)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():   # set up by the trainer under torchrun
            dist.destroy_process_group()
    if summary.get("out"):
        last = summary["log"][-1] if summary["log"] else {}
        keys = [k for k in ("loss", "noise_norm", "mse_prob", "noise_steps", "probe_clean_acc", "probe_fgsm_acc")
                if k in last]
        print(f"{cfg.method}: {summary['rounds']} rounds, {summary['steps']} steps -> {out}/model.pth")
        print(json.dumps({"method": cfg.method, "out": str(out), "rounds": summary["rounds"],
                          "steps": summary["steps"], **{k: last[k] for k in keys}}))
    return 0
