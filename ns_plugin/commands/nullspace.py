"""``ns-plugin nullspace``: the paper's Table 1 for timm names, and the Fig. 2 figure."""
from __future__ import annotations

import json

HELP = "exact patch-embedding nullspace: Table 1 for timm model names, and a Fig. 2-style figure"


def add_arguments(p):
    from ..validation import Float, PathCheck, argtype
    from ._common import add_model_args
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="timm model names (default: the rows of the paper's Table 1)")
    p.add_argument("--figure", metavar="PNG", type=argtype(PathCheck("figure"), "--figure"),
                   help="also write a Fig. 2-style figure (image, noise, noisy image, predictions) for the "
                        "embedded tiny ViT (or --checkpoint)")
    p.add_argument("--scale", type=argtype(Float(0, 1e6, lo_open=True, optional=True), "--scale"), default=None,
                   help="noise coefficient scale for the figure (default: the largest that keeps pixels in [0,1])")
    add_model_args(p)


def run(args) -> int:
    from ..nullspace.exact import PAPER_TABLE1, table1

    names = args.models or ([] if args.figure else list(PAPER_TABLE1))
    if names:
        rows = table1(names, progress=True)
        print(f"{'model':40s} {'patch':>7s} {'d':>6s} {'c·r²':>6s} {'nullity':>8s} {'paper':>6s}")
        for r in rows:
            paper = PAPER_TABLE1.get(r["model"], "")
            print(f"{r['model']:40s} {r['patch_size']:>7s} {r['embed_dim']:>6d} {r['input_dim']:>6d} "
                  f"{r['nullity']:>8d} {str(paper):>6s}")
        print("nullity from randomly initialised weights (full rank): trained weights can raise it, e.g. the "
              "paper's 2 for the released ViT-B/16.")
        print(json.dumps({"table1": rows}))
    if args.figure:
        from ..nullspace.exact import figure2
        from ._common import load_model
        info = figure2(load_model(args), args.figure, scale=args.scale)
        print(f"figure: {args.figure}")
        print(json.dumps(info))
    return 0
