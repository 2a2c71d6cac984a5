"""Distributed training pieces: process-group initialisation under ``torchrun`` and the noise search run once
on rank 0 and broadcast to every rank (Algorithm 1 of "Approximate Nullspace Augmented Finetuning for Robust
Vision Transformers", identical noise on all ranks). The DDP unwrapper is :func:`ns_plugin.models.strip_parallel`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..models import strip_parallel  # noqa: F401  (the one DDP unwrapper, re-exported for the trainer)
from .config import TrainConfig
from .state import round_seed


def init_distributed() -> Tuple[int, int, torch.device]:
    """``(rank, world_size, device)``. Under ``torchrun`` (``WORLD_SIZE`` > 1) initialises the process group:
    NCCL on CUDA, gloo otherwise. Outside it: ``(0, 1, cuda:0 or cpu)``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            from datetime import timedelta
            # the other ranks wait in a broadcast while rank 0 searches the noise (up to 3000 steps)
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(hours=2))
        return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")
    return 0, 1, torch.device("cuda:0" if cuda else "cpu")


def search_and_broadcast(raw: nn.Module, data, cfg: TrainConfig, rnd: int, *,
                         init: Optional[torch.Tensor] = None, world: int = 1, rank: int = 0,
                         device: Optional[torch.device] = None, confirm: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Run ``ns_plugin.nullspace.search.search_noise`` on rank 0 (fp32, eval mode, unwrapped model,
    init seeded by ``(cfg.seed, rnd)``) and ``dist.broadcast`` the noise and its statistics to every rank.

    Returns ``(noise (1, N, D), {"noise_steps", "mse_prob", "noise_norm", "reached", "search_seconds"})``;
    every rank gets the identical noise. ``data`` (images tensor, Dataset or iterable of batches, drawn in
    minibatches of ``cfg.search_batch_size``) is only used (and needed) on rank 0. ``confirm`` (rank 0): fixed
    images a candidate stop must also hold on (``cfg.stop_confirm_batches``); then ``confirm_mse_prob`` too."""
    from ..anatomy import token_shape

    device = device or next(raw.parameters()).device
    n, d = token_shape(raw)
    stats = torch.zeros(6, dtype=torch.float64, device=device)
    if rank == 0:
        from ..nullspace.search import search_noise

        g = torch.Generator().manual_seed(round_seed(cfg.seed, rnd, 1))
        was = raw.training
        raw.eval()
        try:
            with torch.autocast(device.type, enabled=False):
                noise, rec = search_noise(raw, data, eps=cfg.eps, lim=cfg.lim, lr=cfg.noise_lr,
                                          max_steps=cfg.noise_max_steps, init=init, mode=cfg.search,
                                          batch_size=cfg.search_batch_size, generator=g, progress=False,
                                          confirm=confirm)
        finally:
            raw.train(was)
            for p in raw.parameters():
                p.grad = None
        noise = noise.detach().float().reshape(1, n, d).to(device)
        cm = float("nan") if rec.confirm_mse_prob is None else rec.confirm_mse_prob
        stats = torch.tensor([rec.steps, rec.mse_prob, rec.norm, float(bool(rec.reached)), rec.seconds, cm],
                             dtype=torch.float64, device=device)
    else:
        noise = torch.zeros(1, n, d, device=device)
    if world > 1:
        import torch.distributed as dist
        dist.broadcast(noise, 0)
        dist.broadcast(stats, 0)
    s = stats.tolist()
    out = {"noise_steps": int(s[0]), "mse_prob": s[1], "noise_norm": s[2], "reached": bool(s[3]),
           "search_seconds": s[4]}
    if cfg.stop_confirm_batches:
        out["confirm_mse_prob"] = s[5]
    return noise, out
