"""Arguments and loaders shared by several subcommands."""
from __future__ import annotations

import argparse

from ..errors import NSPluginError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="FILE",
                   help="safe checkpoint of the embedded tiny ViT (default: train or reuse the cached one)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that needs full unpickling (only for files you trust)")
    p.add_argument("--use-ema", action="store_true", help="load the checkpoint's EMA weights")


def load_model(args: argparse.Namespace, progress: bool = True):
    """The model the user named: a checkpoint of the embedded default, or the cached trained default."""
    from ..checkpoint import read_checkpoint, load_into
    from ..embedded import default_model
    from ..models import build_default_model

    if getattr(args, "checkpoint", None):
        ckpt = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        key = "state_dict_ema" if args.use_ema else "state_dict"
        if not isinstance(ckpt.get(key), dict):
            raise NSPluginError(f"checkpoint {args.checkpoint} has no {key!r} entry")
        n_cls = ckpt[key].get("1.head.weight")
        model = build_default_model(num_classes=n_cls.shape[0] if n_cls is not None else 10)
        return load_into(model, ckpt[key], source=f"checkpoint {args.checkpoint}").eval()
    model, _ = default_model(progress=progress)
    return model
