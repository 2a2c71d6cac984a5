"""``ns-plugin evaluate``: clean accuracy of a checkpoint on the embedded test split or an image folder."""
from __future__ import annotations

import json

HELP = "evaluate a model's clean accuracy on the embedded test set or an ImageNet-style folder"


def add_arguments(p):
    from ..validation import Int, PathCheck, argtype
    from ._common import add_model_args
    add_model_args(p)
    p.add_argument("--data", metavar="DIR", type=argtype(PathCheck("dir"), "--data"),
                   help="ImageNet-style folder root/<class>/<image> (default: digits test split); its class "
                        "folder names must be classes of the model (matched by name when the checkpoint "
                        "records them)")
    p.add_argument("--batch-size", type=argtype(Int(1, 100_000), "--batch-size"), default=128)


def model_classes(args):
    """The class names the model was trained on, when known: recorded in the checkpoint by the trainer, or
    the digits' '0'..'9' for the embedded default (and checkpoints trained on digits)."""
    if not getattr(args, "checkpoint", None):
        return [str(i) for i in range(10)]
    from ..checkpoint import read_checkpoint
    meta = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint).get("meta") or {}
    if isinstance(meta.get("classes"), list):
        return meta["classes"]
    if (meta.get("config") or {}).get("data") == "digits":
        return [str(i) for i in range(10)]
    return None


def run(args) -> int:
    import torch
    from ..data import image_folder, load_digits, tensors
    from ..models import accuracy
    from ..models import input_size
    from ..models import model_num_classes
    from ..validation import match_classes
    from ._common import load_model

    model = load_model(args)
    n_model = model_num_classes(model)
    if args.data:
        c, h, w = input_size(model)
        ds = image_folder(args.data, h)
        idx = match_classes(ds.classes, n_model, model_classes(args), where=f"data folder {args.data}",
                            fix="evaluate on a folder of the model's classes")
        x, y = tensors(ds)
        if idx is not None:
            y = torch.tensor(idx)[y]
    else:
        x, y = load_digits().test.tensors
        match_classes([str(i) for i in range(10)], n_model, None, where="the digits test set",
                      fix="pass --data with a folder of the model's classes")
    acc = accuracy(model, x, y, args.batch_size)
    print(json.dumps({"n": len(y), "clean_acc": round(100 * acc, 2)}))
    return 0
