"""``ns-plugin noise``: learn an encoder-level ε-approximate nullspace noise and report its quality.

arXiv:2403.10476, Eq. 7-8 / Algorithm 1 lines 3-14 (search), Fig. 3 (quality with the permuted control) and
Fig. 5 (``--plot``: scaling and convex-combination behaviour).
"""
from __future__ import annotations

import json

HELP = "learn an encoder-level ε-approximate nullspace noise (Eq. 8) and print its record and quality"


def add_arguments(p):
    from ..validation import Float, Int, PathCheck, argtype
    from ._common import add_model_args
    add_model_args(p)
    p.add_argument("--data", metavar="DIR",
                   type=argtype(PathCheck("dir"), "--data"), help="ImageNet-style folder root/<class>/<image> to search on "
                                                 "(default: the embedded digits train split)")
    p.add_argument("--eval-data", metavar="DIR",
                   type=argtype(PathCheck("dir"), "--eval-data"), help="folder for the quality metrics (default: --data, or the "
                                                      "digits test split)")
    p.add_argument("--eps",
                   type=argtype(Float(0, 2, lo_open=True), "--eps"), default=0.03,
                   help="ε of the approximate nullspace (default 0.03)")
    p.add_argument("--lim", type=argtype(Float(0, 1e4, lo_open=True), "--lim"), default=3.0, help="init U(-lim, lim) (default 3)")
    p.add_argument("--lr",
                   type=argtype(Float(0, 100, lo_open=True), "--lr"), default=0.1,
                   help="AdamW learning rate of the noise (default 0.1)")
    p.add_argument("--max-steps",
                   type=argtype(Int(0, 10 ** 7), "--max-steps"), default=3000, help="cap on noise updates (default 3000)")
    p.add_argument("--batch-size",
                   type=argtype(Int(1, 100_000), "--batch-size"), default=128, help="search batch size (default 128)")
    p.add_argument("--mode", choices=("fast", "faithful"), default="fast",
                   help="fast (shared patch embedding, one forward pair per step) or faithful (reference loop); "
                        "same result")
    p.add_argument("--seed", type=argtype(Int(0), "--seed"), default=0, help="seed of the init and the data order")
    p.add_argument("--out", metavar="FILE",
                   type=argtype(PathCheck("out_file"), "--out"),
                   help="save {'noise', 'record', 'quality'} here (torch.save, atomic)")
    p.add_argument("--plot", metavar="DIR",
                   type=argtype(PathCheck("out_dir"), "--plot"), help="write the α-influence curve and the convex-combination "
                                                 "heatmap (Fig. 5) as PNGs into DIR")
    p.add_argument("--num-noises", type=argtype(Int(1, 1000), "--num-noises"), default=3,
                   help="noises learnt from different inits for the --plot convex grid (default 3, >= 2)")
    p.add_argument("--grid-step",
                   type=argtype(Float(0, 1, lo_open=True), "--grid-step"), default=0.1,
                   help="α step of the convex-combination grid (default 0.1)")
    p.add_argument("--eval-limit",
                   type=argtype(Int(1), "--eval-limit"), metavar="N", help="use only the first N held-out images for the metrics")
    p.add_argument("--progress", action="store_true", help="show progress bars")


def _folder(path, model):
    from ..data import image_folder, tensors
    from ..models import input_size
    size = input_size(model)
    return tensors(image_folder(path, size[1] if size else None))


def run(args) -> int:
    from ..checkpoint import atomic_save
    from ..data import load_digits
    from ..errors import NSPluginError
    from ..nullspace.metrics import noise_quality
    from ..nullspace.search import search_noise
    from ._common import load_model

    if args.plot and args.num_noises < 2:
        raise NSPluginError(f"--num-noises must be >= 2 for the convex-combination plot, got {args.num_noises}")
    model = load_model(args, progress=args.progress)
    if args.data:
        x_train, y_train = _folder(args.data, model)
        x_eval, y_eval = _folder(args.eval_data, model) if args.eval_data else (x_train, y_train)
    else:
        splits = load_digits(seed=0)
        x_train, _ = splits.train.tensors
        x_eval, y_eval = _folder(args.eval_data, model) if args.eval_data else splits.test.tensors
    if args.eval_limit is not None:
        if args.eval_limit < 1:
            raise NSPluginError(f"--eval-limit must be >= 1, got {args.eval_limit}")
        x_eval, y_eval = x_eval[:args.eval_limit], (y_eval[:args.eval_limit] if y_eval is not None else None)
    kw = dict(eps=args.eps, lim=args.lim, lr=args.lr, max_steps=args.max_steps, batch_size=args.batch_size,
              mode=args.mode, progress=args.progress)
    noise, rec = search_noise(model, x_train, generator=args.seed, **kw)
    q = noise_quality(model, noise, x_eval, y_eval, generator=args.seed)
    print(f"noise {tuple(noise.shape)}: {rec.steps} steps in {rec.seconds:.1f} s, mse_prob {rec.mse_prob:.4f} "
          f"({'inside' if rec.reached else 'NOT inside'} ε = {rec.eps:g}), norm {rec.norm:.2f}")
    print(f"on {q['n']} held-out images: predictions kept {q['pred_match']:.1f}% (permuted control "
          f"{q['permuted_pred_match']:.1f}%), mse_prob {q['mse_prob']:.4f} (permuted {q['permuted_mse_prob']:.4f})")
    summary = dict(record=rec.to_dict(), quality=q)
    if args.plot:
        from pathlib import Path
        from ..nullspace.algebra import convex_grid, plot_convex_grid, plot_scale_influence, scale_influence
        noises = [noise] + [search_noise(model, x_train, generator=args.seed + i, **kw)[0]
                            for i in range(1, args.num_noises)]
        scale = scale_influence(model, noises, x_eval)
        grid = convex_grid(model, noises, x_eval, pairs=min(10, args.num_noises * (args.num_noises - 1)),
                           step=args.grid_step, generator=args.seed)
        out = Path(args.plot)
        f1 = plot_scale_influence(scale, out / "scale_influence.png", eps=args.eps)
        f2 = plot_convex_grid(grid, out / "convex_grid.png", eps=args.eps)
        diag = [grid["grid"][i][len(grid["alphas"]) - 1 - i] for i in range(len(grid["alphas"]))]
        print(f"figures: {f1}, {f2} (max mse_prob on α1 + α2 = 1: {max(diag):.4f})")
        summary.update(scale_influence=scale, convex_diagonal_max=max(diag), figures=[str(f1), str(f2)])
    if args.out:
        atomic_save({"noise": noise.detach().cpu(), "record": rec.to_dict(), "quality": q}, args.out)
        print(f"noise saved to {args.out}")
    print(json.dumps(summary))
    return 0
