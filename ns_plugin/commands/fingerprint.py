"""``ns-plugin fingerprint``: does SUSPECT derive from REFERENCE? Nullspace fingerprint of the patch embedding
(OpenReview:d8VrVfNARSy §9, "model patenting")."""
from __future__ import annotations

import json

HELP = ("compare the patch-embedding nullspaces of two models (OpenReview:d8VrVfNARSy §9): score, threshold and verdict on "
        "whether SUSPECT derives from REFERENCE")


def add_arguments(p):
    from ..validation import Float, PathCheck, argtype
    from ..applications.fingerprint import DEFAULT_THRESHOLD
    p.add_argument("reference", metavar="REFERENCE", nargs="?",
                   help="checkpoint file, a saved fingerprint (.pt from --save-fingerprint), 'default' (the "
                        "embedded tiny ViT) or a timm model name (pretrained weights: needs network)")
    p.add_argument("suspect", metavar="SUSPECT", nargs="?", help="the same kinds as REFERENCE")
    p.add_argument("--arch", default="default", metavar="NAME",
                   help="architecture of checkpoint files: 'default' (the embedded tiny ViT) or a timm name")
    p.add_argument("--threshold", type=argtype(Float(-1, 1), "--threshold"), default=DEFAULT_THRESHOLD,
                   help=f"decision threshold on the chance-corrected score (default {DEFAULT_THRESHOLD})")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (only files you trust)")
    p.add_argument("--save-fingerprint", metavar="PT",
                   type=argtype(PathCheck("out_file"), "--save-fingerprint"),
                   help="also save REFERENCE's fingerprint to this file")
    p.add_argument("--evaluate", action="store_true",
                   help="instead: build derived and unrelated models here and report true/false positive rates "
                        "(several minutes)")


def _load(spec: str, args, what: str):
    from pathlib import Path
    import torch
    from ..errors import NSPluginError
    from ..applications.fingerprint import Fingerprint, fingerprint
    from .watermark import load_named_model

    path = Path(spec)
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - let read_checkpoint give the precise message below
            obj = None
        if isinstance(obj, dict) and "basis" in obj and "patch_size" in obj:
            return Fingerprint.from_dict(obj)
        model = load_named_model(args.arch, str(path), trust=args.trust_checkpoint)
        return fingerprint(model)
    if spec == "default" or "/" not in spec and not path.suffix:
        return fingerprint(load_named_model(spec, None, trust=args.trust_checkpoint))
    raise NSPluginError(f"{what} {spec!r} is neither an existing file nor 'default' nor a timm model name")


def run(args) -> int:
    from ..errors import NSPluginError
    from ..applications.fingerprint import compare, evaluate_fingerprint

    if args.evaluate:
        res = evaluate_fingerprint(threshold=args.threshold, progress=True)
        for r in res["rows"]:
            print(f"{r['name']:48s} derived={str(r['derived']):5s} score={r['score']:+.4f} "
                  f"detected={r['detected']}")
        print(f"TPR {100 * res['tpr']:.1f}% ({res['n_derived']} derived), FPR {100 * res['fpr']:.1f}% "
              f"({res['n_unrelated']} unrelated) at threshold {res['threshold']}; random-subspace scores "
              f"{res['null']['mean']:+.4f} ± {res['null']['std']:.4f}; blind spot (patch embedding "
              f"re-initialised): {res['blind_spot_patch_embed_reinit_score']:+.4f}")
        print(json.dumps(res))
        return 0
    if not args.reference or not args.suspect:
        raise NSPluginError("give REFERENCE and SUSPECT (checkpoint files, 'default' or timm names), or --evaluate")
    ref = _load(args.reference, args, "REFERENCE")
    if args.save_fingerprint:
        from ..checkpoint import atomic_save
        atomic_save(ref.to_dict(), args.save_fingerprint)
    sus = _load(args.suspect, args, "SUSPECT")
    m = compare(ref, sus, threshold=args.threshold)
    verdict = "DERIVED from the reference" if m.derived else "not derived from the reference"
    extra = f" ({m.details['reason']})" if not m.details.get("comparable", True) else ""
    print(f"score {m.score:+.4f} (1 = same nullspace, ~0 = unrelated; nullspace overlap "
          f"{m.details['overlap']:.4f} vs chance {m.details['chance']:.4f}), threshold {m.threshold}: "
          f"{verdict}{extra}")
    print(json.dumps({"reference": args.reference, "suspect": args.suspect, **m.to_dict()}))
    return 0
