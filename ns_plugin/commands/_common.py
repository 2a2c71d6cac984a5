"""Arguments and loaders shared by several subcommands."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="FILE",
                   help="safe checkpoint of the embedded tiny ViT (default: train or reuse the cached one)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that needs full unpickling (only for files you trust)")
    p.add_argument("--use-ema", action="store_true", help="load the checkpoint's EMA weights")


def load_model(args: argparse.Namespace, progress: bool = True):
    """The model the user named: a checkpoint of the embedded default, or the cached trained default
    (:func:`ns_plugin.models.create_model`)."""
    from ..models import create_model

    return create_model("default", checkpoint=getattr(args, "checkpoint", None) or None,
                        use_ema=bool(getattr(args, "use_ema", False)),
                        trust=bool(getattr(args, "trust_checkpoint", False)), progress=progress).eval()
