"""``ns-plugin demo``: the main job on the embedded default."""
from __future__ import annotations

import json

HELP = "run the main job on the embedded default (digits + tiny ViT) and write results/demo/"


def add_arguments(p):
    p.add_argument("--out", default="results/demo", help="results folder (default: results/demo)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from pathlib import Path
    from ..checkpoint import save_checkpoint
    from ..embedded import train_default_model

    out = Path(args.out)
    model, metrics = train_default_model(seed=args.seed)
    print(f"tiny ViT on digits: test accuracy {100 * metrics['test_acc']:.2f}% "
          f"(val {100 * metrics['val_acc']:.2f}%), trained in {metrics['seconds']:.1f} s")
    summary = {"test_acc": round(100 * metrics["test_acc"], 2), "train_seconds": round(metrics["seconds"], 1)}
    try:
        from ..nullspace.exact import exact_nullspace
    except ImportError:
        exact_nullspace = None
    if exact_nullspace is not None:
        ns = exact_nullspace(model)
        print(f"exact patch-embedding nullspace: nullity {ns.nullity} of input dim {ns.input_dim}")
        summary["nullity"] = ns.nullity
    save_checkpoint(out / "model.pth", model, meta={"arch": "ns_vit_digits", "metrics": metrics})
    print(f"checkpoint: {out / 'model.pth'}")
    print(json.dumps(summary))
    return 0
