"""Measure the ns_plugin attacks (and torchattacks' FGSM at 1/255, as in the papers) on the embedded tiny ViT.

    PYTHONPATH=. python benchmarks/attacks.py [--n 64] [--steps 250]

Prints one JSON line: clean / robust accuracy per attack, nullspace invariance figures, targeted-noise
distances and embedding-matching cosine similarity.
"""
import argparse
import json
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="test images (default 64)")
    p.add_argument("--steps", type=int, default=250, help="PatchFool steps (default 250, the paper's)")
    p.add_argument("--match-steps", type=int, default=300, help="EmbeddingMatch steps (default 300)")
    p.add_argument("--quick", action="store_true", help="8 images, 3 PatchFool and 5 matching steps (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.match_steps = 8, 3, 5

    import ns_plugin
    import torchattacks
    from ns_plugin.data import load_digits
    from ns_plugin.embedded import default_model
    from ns_plugin.models import accuracy

    ns_plugin.register()
    torch.manual_seed(0)
    model, _ = default_model(progress=False)
    model.eval()
    x, y = load_digits().test.tensors
    x, y = x[:args.n], y[:args.n]
    res = {"n": len(x), "clean_acc": accuracy(model, x, y)}

    def run(name, atk, **kw):
        t = time.time()
        adv = atk(x, y, **kw)
        res[f"{name}_acc"] = accuracy(model, adv, y)
        res[f"{name}_seconds"] = round(time.time() - t, 2)
        return adv

    run("fgsm_1_255", torchattacks.FGSM(model, eps=1 / 255))
    run("patchfool_1patch", torchattacks.PatchFool(model, patches=1, steps=args.steps))
    run("patchfool_mild_16_255", torchattacks.PatchFool(model, patches=1, eps=16 / 255, steps=args.steps))
    run("patchfool_sparse_16px", torchattacks.PatchFool(model, patches=1, sparse_pixels=16, steps=args.steps))

    nn_atk = torchattacks.NullspaceNoise(model, std=0.1)
    run("nullspace_noise", nn_atk)
    res["nullspace_noise_pred_match"] = nn_atk.last_info["pred_match"]
    res["nullspace_noise_embedding_residual"] = nn_atk.last_info["embedding_residual"]
    res["nullspace_noise_l2_mean"] = float(nn_atk.last_info["noise_l2"].mean())
    res["nullspace_noise_kept_mean"] = float(nn_atk.last_info["kept"].mean())
    clip = torchattacks.NullspaceNoise(model, std=0.1, box="clip")
    run("nullspace_noise_clipped", clip)
    res["nullspace_noise_clipped_pred_match"] = clip.last_info["pred_match"]

    target = x.roll(1, 0)
    for name, kw in [("targeted_all", {}), ("targeted_all_clip", {"box": "clip"}),
                     ("targeted_red", {"channels": "red"}),
                     ("targeted_red_embedding", {"channels": "red", "objective": "embedding"})]:
        atk = torchattacks.TargetedNullspace(model, **kw)
        run(name, atk, target_images=target)
        info = atk.last_info
        res[f"{name}_pred_match"] = info["pred_match"]
        res[f"{name}_target_l2_before"] = float(info["target_l2_before"].mean())
        res[f"{name}_target_l2_after"] = float(info["target_l2_after"].mean())
        res[f"{name}_embedding_residual"] = info["embedding_residual"]

    em = torchattacks.EmbeddingMatch(model, steps=args.match_steps)
    adv = run("embedding_match", em, target_images=target)
    with torch.no_grad():
        res["embedding_match_target_pred_match"] = float((model(adv).argmax(1) == model(target).argmax(1)).float().mean())
    res["embedding_match_cosine"] = float(em.last_info["cosine"].mean())
    res["embedding_match_cosine_start"] = float(em.last_info["cosine_start"].mean())
    res["embedding_match_pixel_change_mean_abs"] = float(em.last_info["pixel_change_mean_abs"].mean())
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
