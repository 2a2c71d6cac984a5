"""``ns-plugin evaluate``: clean accuracy of a checkpoint on the embedded test split or an image folder."""
from __future__ import annotations

import json

HELP = "evaluate a model's clean accuracy on the embedded test set or an ImageNet-style folder"


def add_arguments(p):
    from ._common import add_model_args
    add_model_args(p)
    p.add_argument("--data", metavar="DIR", help="ImageNet-style folder root/<class>/<image> (default: digits test split)")
    p.add_argument("--batch-size", type=int, default=128)


def run(args) -> int:
    from ..data import image_folder, load_digits, tensors
    from ..models import accuracy
    from ..models import input_size
    from ._common import load_model

    model = load_model(args)
    if args.data:
        c, h, w = input_size(model)
        x, y = tensors(image_folder(args.data, h))
    else:
        x, y = load_digits().test.tensors
    acc = accuracy(model, x, y, args.batch_size)
    print(json.dumps({"n": len(y), "clean_acc": round(100 * acc, 2)}))
    return 0
