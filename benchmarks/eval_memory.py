#!/usr/bin/env python
"""Peak memory of evaluating a validation folder of N vs k*N variable-size JPEGs (issue: memory must not grow
with the folder's size).

    python benchmarks/eval_memory.py --n 200 --factor 4

Each measurement runs in a fresh process (peak RSS = ``ru_maxrss`` of that process, plus its DataLoader workers
when ``--workers`` > 0): ``stream`` is the harness's path (``folder_accuracy`` with EasyRobust's benchmark
transform through a DataLoader); ``stack`` is the old path that decoded the whole folder into one tensor first,
for contrast. The model is a one-block ViT at 224 so the numbers are about the data, not the model. Ends with one
JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = ((500, 375), (375, 500), (333, 500), (500, 333), (250, 200), (640, 480))


def make_folder(root: Path, n: int, classes: int = 5) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:06d}.JPEG", quality=85)
    return root


CHILD = r'''
import resource, sys, time, torch
torch.set_num_threads(1)
from timm.models.vision_transformer import VisionTransformer
from ns_plugin.models import wrap
from ns_plugin.data import eval_transform, image_folder, tensors
from ns_plugin.evaluation.suite import folder_accuracy, top1
path, mode, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = wrap(VisionTransformer(img_size=224, patch_size=16, embed_dim=48, depth=1, num_heads=2, num_classes=1000),
             (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
t0 = time.time()
if mode == "stream":
    acc = folder_accuracy(model, path, transform=eval_transform(224), batch_size=50, workers=workers)
else:
    x, y = tensors(image_folder(path, transform=eval_transform(224)))
    acc = top1(model, x, y, batch_size=50)
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(acc, self_kb, child_kb, time.time() - t0)
'''


def measure(path: Path, mode: str, workers: int):
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(workers)], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    acc, self_kb, child_kb, secs = out.stdout.split()
    return {"acc": float(acc), "peak_rss_mb": round(int(self_kb) / 1024, 1),
            "worker_peak_rss_mb": round(int(child_kb) / 1024, 1), "seconds": round(float(secs), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--modes", default="stream,stack")
    p.add_argument("--quick", action="store_true", help="100 and 400 images, no worker processes (for the tests)")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.factor, a.workers = 100, 4, 0
    res = {"n": a.n, "factor": a.factor, "workers": a.workers}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (a.n, a.n * a.factor):
            folder = make_folder(Path(tmp) / f"val{n}", n)
            for mode in a.modes.split(","):
                r = measure(folder, mode, a.workers if mode == "stream" else 0)
                res[f"{mode}_{n}"] = r
                print(f"{mode:6s} N={n:5d}: peak RSS {r['peak_rss_mb']:7.1f} MB (workers {r['worker_peak_rss_mb']} MB), "
                      f"{r['seconds']} s", flush=True)
    big, small = a.n * a.factor, a.n
    if "stream" in a.modes:
        res["stream_growth_mb"] = round(res[f"stream_{big}"]["peak_rss_mb"] - res[f"stream_{small}"]["peak_rss_mb"], 1)
    if "stack" in a.modes:
        res["stack_growth_mb"] = round(res[f"stack_{big}"]["peak_rss_mb"] - res[f"stack_{small}"]["peak_rss_mb"], 1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
