"""``ns-plugin watermark``: output-preserving watermarking with the patch-embedding nullspace (OpenReview:d8VrVfNARSy §6,
Eq. 7, A.2; arXiv:2403.10476 appendix E)."""
from __future__ import annotations

import json

HELP = ("watermark IMAGE with WATERMARK inside the model's patch-embedding nullspace, so the model's output "
        "is unchanged (OpenReview:d8VrVfNARSy Eq. 7); the watermark is resized to the image size")


def add_model_choice(p, *, flag: str = "--model") -> None:
    from ._common import add_model_args
    p.add_argument(flag, default="default", metavar="NAME",
                   help="'default' (the embedded tiny ViT, or --checkpoint of it) or a timm model name; a timm "
                        "name loads --checkpoint if given, else timm's pretrained weights (needs network)")
    add_model_args(p)


def load_named_model(name: str, checkpoint=None, *, trust: bool = False, use_ema: bool = False,
                     progress: bool = True):
    """A classifier taking [0, 1] images: the embedded default (``name='default'``; ``checkpoint`` = its
    checkpoint) or ``timm.create_model(name)`` with weights from ``checkpoint`` (an ns_plugin or plain timm
    state dict; ``0.mean``/``0.std`` keys keep their normaliser, otherwise timm's ``pretrained_cfg`` mean/std
    is put in front) or, without a checkpoint, timm's pretrained weights."""
    import argparse
    from ..errors import NSPluginError
    from ._common import load_model

    if name in (None, "", "default"):
        return load_model(argparse.Namespace(checkpoint=checkpoint, trust_checkpoint=trust, use_ema=use_ema),
                          progress=progress)
    import timm
    from ..models import create_model

    if name not in timm.list_models():
        raise NSPluginError(f"unknown model {name!r}: use 'default' or a timm model name (see timm.list_models())")
    if checkpoint:
        return create_model(name, checkpoint=checkpoint, trust=trust, use_ema=use_ema).eval()
    return create_model(name, pretrained=True).eval()


def add_arguments(p):
    from ..validation import PathCheck, argtype
    p.add_argument("image", metavar="IMAGE",
                   help="image file to watermark (must already have the model's input size, e.g. 32x32 for the "
                        "default; it is refused otherwise), or 'digits:K' for test digit K of the embedded data")
    p.add_argument("watermark", metavar="WATERMARK",
                   help="watermark image file (RESIZED to the image size, bilinear; grey is repeated over the "
                        "channels) or 'text:STRING' for rendered text, e.g. text:NS")
    add_model_choice(p)
    p.add_argument("--p", type=int, choices=(1, 2), default=1,
                   help="norm of Eq. 7 (default 1, the paper's choice)")
    p.add_argument("--solver", choices=("exact", "highs", "slsqp"), default="exact",
                   help="'exact' (batched semismooth Newton for p=2, batched interior-point LP for p=1; default), "
                        "'highs' (p=1 only, HiGHS simplex per patch) or the paper's SciPy "
                        "SLSQP (slow: seconds per patch)")
    p.add_argument("--out", required=True, metavar="FILE", type=argtype(PathCheck("out_file"), "--out"),
                   help="watermarked image (8-bit, format from the suffix, e.g. .png)")
    p.add_argument("--save-tensor", metavar="PT", type=argtype(PathCheck("out_file"), "--save-tensor"),
                   help="also save the float watermarked image as a .pt tensor (8-bit files leave the nullspace by "
                        "up to 1/510 per pixel; the tensor is exact)")
    p.add_argument("--figure", metavar="PNG",
                   type=argtype(PathCheck("figure"), "--figure"),
                   help="also write a figure: watermark, original, watermarked, |noise|")


def _load_image(spec: str, size, channels, what: str):
    from ..errors import NSPluginError
    from ..applications.watermark import read_image, text_watermark
    if spec.startswith("digits:"):
        from ..data import load_digits
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise NSPluginError(f"{what} {spec!r}: expected digits:K with an integer K") from None
        x = load_digits().test.tensors[0]
        if not 0 <= k < len(x):
            raise NSPluginError(f"{what} {spec!r}: K must be in 0..{len(x) - 1}")
        return x[k]
    if spec.startswith("text:"):
        text = spec.split(":", 1)[1]
        if not text.strip():
            raise NSPluginError(f"{what} {spec!r}: give some text after 'text:'")
        return text_watermark(text, size, channels)
    return read_image(spec, what)


def run(args) -> int:
    from pathlib import Path
    from ..errors import NSPluginError
    from ..models import input_size
    from ..nullspace.exact import exact_nullspace
    from ..applications.watermark import (evaluate_watermark, fit_watermark, watermark_figure,
                                          watermark_images, write_image)

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".bmp", ".tif", ".tiff", ".ppm", ".webp"):
        raise NSPluginError(f"--out {args.out!r}: use a lossless image suffix (.png, .bmp, .tif, .ppm, .webp); "
                            f"JPEG would destroy the nullspace watermark")
    model = load_named_model(args.model, args.checkpoint, trust=args.trust_checkpoint, use_ema=args.use_ema)
    ns = exact_nullspace(model)
    if ns.nullity == 0:
        raise NSPluginError(f"model {args.model!r} has no exact patch-embedding nullspace (nullity 0: embedding dim "
                            f"{ns.embed_dim} >= patch dim {ns.input_dim}), so no output-preserving watermark exists")
    want = input_size(model)
    c = ns.in_chans
    img = _load_image(args.image, want[1:] if want else None, c, "image")
    if img.shape[0] != c:
        if img.shape[0] == 1:
            img = img.expand(c, -1, -1)
        else:
            raise NSPluginError(f"image has {img.shape[0]} channels but the model takes {c}")
    if want is not None and tuple(img.shape[-2:]) != tuple(want[1:]):
        raise NSPluginError(f"image {args.image!r} is {img.shape[-1]}x{img.shape[-2]} but the model takes "
                            f"{want[2]}x{want[1]}; resize it first (images are refused, watermarks are resized)")
    size = tuple(img.shape[-2:])
    wm_raw = _load_image(args.watermark, size, c, "watermark")
    wm = fit_watermark(wm_raw, c, size)
    if tuple(wm_raw.shape[-2:]) != size:
        print(f"watermark resized from {wm_raw.shape[-1]}x{wm_raw.shape[-2]} to {size[1]}x{size[0]}")
    x = img[None].float().contiguous()
    res = watermark_images(ns, x, wm, p=args.p, solver=args.solver, progress=True)
    exact = x.double() + res.noise            # float64 watermarked image (exactly in the nullspace)
    write_image(out, res.images[0])
    if args.save_tensor:
        from ..checkpoint import atomic_save
        atomic_save({"watermarked": exact, "original": x, "watermark": wm}, args.save_tensor)
    stats = evaluate_watermark(model, x, exact.float(), wm)
    if args.figure:
        watermark_figure(args.figure, wm, x, exact)
    summary = {"out": str(out), "p": args.p, "solver": args.solver, "nullity": ns.nullity,
               "seconds": round(float(res.info["seconds"]), 4),
               "objective": float(res.objective.sum()),
               "embedding_residual": float(res.info["embedding_residual"]),
               "pred_match": stats["pred_match"], "abs_dprob_source_class_pct": stats["mean_abs_dprob"],
               "pred_match_8bit_file": stats["pred_match_uint8"],
               "abs_dprob_8bit_file_pct": stats["mean_abs_dprob_uint8"],
               "psnr_vs_watermark": round(stats["psnr_vs_watermark"], 3),
               "psnr_vs_original": round(stats["psnr_vs_original"], 3)}
    print(f"watermarked {args.image} with {args.watermark} (p={args.p}, {args.solver}) in {summary['seconds']} s: "
          f"prediction kept: {'yes' if stats['pred_match'] == 100 else 'NO'}, |Δp(source)| "
          f"{stats['mean_abs_dprob']:.2g}% (8-bit file: {stats['mean_abs_dprob_uint8']:.2g}%), "
          f"PSNR vs watermark {stats['psnr_vs_watermark']:.2f} dB (original: {stats['psnr_original_vs_watermark']:.2f} dB)")
    print(f"wrote {out}" + (f" and {args.figure}" if args.figure else ""))
    print(json.dumps(summary))
    return 0
