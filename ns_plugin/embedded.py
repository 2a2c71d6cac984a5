"""The embedded default job: train the tiny ViT on the digits data, reproducibly, on CPU."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import Splits, load_digits
from .models import accuracy


def train_default_model(splits: Optional[Splits] = None, *, epochs: int = 30, seed: int = 0,
                        lr: float = 2e-3, batch_size: int = 64, progress: bool = True
                        ) -> Tuple[nn.Module, Dict[str, float]]:
    """Train :func:`ns_plugin.models.build_default_model` on the digits split, deterministically.

    AdamW (wd 0.05), cosine schedule with one warm-up epoch, batch 64. Returns the model in eval mode and
    ``{"train_acc", "val_acc", "test_acc", "seconds"}``. About 20 s on 2 CPU cores for ~96% test accuracy.
    """
    import time
    from tqdm.auto import tqdm

    from .models import build_default_model

    splits = splits or load_digits(seed=0)
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    model = build_default_model(splits.num_classes, seed=seed)
    x, y = splits.train.tensors
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    warm = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    model.train()
    bar = tqdm(range(epochs), desc="train tiny ViT", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    metrics = {"train_acc": accuracy(model, x, y), "val_acc": accuracy(model, *splits.val.tensors),
               "test_acc": accuracy(model, *splits.test.tensors), "seconds": time.time() - t0}
    return model, metrics


def cache_dir() -> Path:
    """Where trained default models are cached: ``$NS_PLUGIN_CACHE`` or ``~/.cache/ns_plugin``."""
    return Path(os.environ.get("NS_PLUGIN_CACHE", Path.home() / ".cache" / "ns_plugin"))


def default_model(*, seed: int = 0, epochs: int = 30, progress: bool = True, cache: bool = True
                  ) -> Tuple[nn.Module, Dict[str, float]]:
    """The trained embedded default, from the cache when a checkpoint for ``(seed, epochs)`` exists,
    else trained now (and cached, atomically)."""
    from .checkpoint import read_checkpoint, save_checkpoint
    from .models import create_model

    path = cache_dir() / f"vit_digits_s{seed}_e{epochs}.pth"
    if cache and path.is_file():
        model = create_model("ns_vit_digits", checkpoint=path).eval()
        return model, dict(read_checkpoint(path)["meta"].get("metrics", {}))
    model, metrics = train_default_model(seed=seed, epochs=epochs, progress=progress)
    if cache:
        save_checkpoint(path, model, meta={"arch": "ns_vit_digits", "seed": seed, "epochs": epochs,
                                           "metrics": metrics})
    return model, metrics
