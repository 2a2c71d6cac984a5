"""The embedded default job: the tiny ViT on the digits data.

The default model is the **same on every machine**: its weights ship inside the package
(``ns_plugin/_data/vit_digits_s0_e30.safetensors``, 0.6 MB, safetensors: no pickle) and are checked against
the SHA-256 recorded here on every load. Training it from scratch stays available
(:func:`train_default_model`, ``default_model(source="train")``, ``python tools/make_default_weights.py``)
but is not machine-independent: the same command gave 95.28% and 94.17% test accuracy on two machines
(thread counts and BLAS kernels change the float rounding of 600 AdamW steps).
"""
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


#: The packaged default (seed 0, 30 epochs): file name under ``ns_plugin/_data`` and its SHA-256.
PACKAGED_WEIGHTS = "vit_digits_s0_e30.safetensors"
PACKAGED_SHA256 = "04d4f64125fbb2cd1ec4fbf9be584979d14d82cde9c6016f65bc00a4b0b56645"


def packaged_weights_path() -> Path:
    return Path(__file__).resolve().parent / "_data" / PACKAGED_WEIGHTS


def sha256_file(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_packaged_default() -> Tuple[nn.Module, Dict[str, float]]:
    """The packaged default model (eval mode) and its recorded metrics; the file's SHA-256 is verified first."""
    import json

    from safetensors.torch import load as st_load

    from .checkpoint import load_into
    from .errors import NSPluginError
    from .models import build_default_model

    path = packaged_weights_path()
    if not path.is_file():
        raise NSPluginError(f"the packaged default weights {path} are missing; reinstall ns_plugin, or train them "
                            f"with default_model(source='train')")
    data = path.read_bytes()
    import hashlib
    got = hashlib.sha256(data).hexdigest()
    if got != PACKAGED_SHA256:
        raise NSPluginError(f"{path} has SHA-256 {got[:16]}..., expected {PACKAGED_SHA256[:16]}...: the file was "
                            f"changed or corrupted; reinstall ns_plugin (or regenerate it with "
                            f"tools/make_default_weights.py and update PACKAGED_SHA256)")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = load_into(build_default_model(), st_load(data), source=str(path)).eval()
    return model, {k: float(v) for k, v in json.loads(meta.get("metrics", "{}")).items()}


def write_packaged_default(path, model: nn.Module, metrics: Dict[str, float], **info) -> str:
    """Write ``model``'s weights as a safetensors file (metrics and ``info`` as metadata); returns its SHA-256."""
    import json

    from safetensors.torch import save as st_save

    from .checkpoint import state_dict_of
    from .io import atomic_write
    sd = {k: v.contiguous() for k, v in state_dict_of(model).items()}
    meta = {"metrics": json.dumps({k: round(float(v), 6) for k, v in sorted(metrics.items()) if k != "seconds"}),
            **{k: str(v) for k, v in info.items()}}
    blob = st_save(sd, metadata=meta)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
    os.chmod(path, 0o644)   # package data: readable by everyone (mkstemp creates 0600)
    return sha256_file(path)


def default_model(*, seed: int = 0, epochs: int = 30, progress: bool = True, cache: bool = True,
                  source: str = "packaged") -> Tuple[nn.Module, Dict[str, float]]:
    """The embedded default model and its metrics.

    ``source="packaged"`` (default) with ``seed=0, epochs=30``: the weights shipped in the package (SHA-256
    verified), identical on every machine. Other seeds/epochs, or ``source="train"``: trained here by
    :func:`train_default_model` (from the cache when a checkpoint for ``(seed, epochs)`` exists, else trained
    now and cached atomically); these depend on the machine's float rounding."""
    from .checkpoint import read_checkpoint, save_checkpoint
    from .errors import NSPluginError
    from .models import create_model

    if source not in ("packaged", "train"):
        raise NSPluginError(f"source must be 'packaged' or 'train', got {source!r}")
    if source == "packaged" and seed == 0 and epochs == 30:
        return load_packaged_default()

    path = cache_dir() / f"vit_digits_s{seed}_e{epochs}.pth"
    if cache and path.is_file():
        model = create_model("ns_vit_digits", checkpoint=path).eval()
        return model, dict(read_checkpoint(path)["meta"].get("metrics", {}))
    model, metrics = train_default_model(seed=seed, epochs=epochs, progress=progress)
    if cache:
        save_checkpoint(path, model, meta={"arch": "ns_vit_digits", "seed": seed, "epochs": epochs,
                                           "metrics": metrics})
    return model, metrics
