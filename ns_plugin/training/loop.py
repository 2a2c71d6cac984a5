"""The one training loop shared by every method (arXiv:2403.10476 Alg. 1's outer structure for all of them).

``K`` rounds of ``S`` model steps. At the start of each round the method may compute a per-round
quantity (NS: the ε-approximate noise of arXiv:2403.10476 Eq. 8); every step it supplies its loss; the loop does the
rest: AdamW + cosine schedule, AMP on CUDA, gradient clipping, model EMA, DDP, per-round logging and
an atomic resumable checkpoint at every round boundary.

Distributed training (``torchrun``): the model is wrapped in ``DistributedDataParallel``; every global
batch is the same whatever the world size (each rank takes its slice). **The noise is searched once, on
rank 0, with the unwrapped model, and broadcast** (``dist.broadcast``) to every rank together with its
statistics, so all ranks train with the identical noise. The other ranks wait during the search.

Resume: ``out/last.pth`` (written atomically, weights_only-loadable) holds the model, optimiser,
scheduler, AMP scaler, EMA, the method's state (the current noise), the round, the data position and
every rank's RNG states (torch, CUDA, Python, NumPy as tensors). A run killed at any point and resumed
reproduces an uninterrupted run exactly on CPU.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from dataclasses import replace as dataclasses_replace

from ..errors import NSPluginError
from ..evaluation.report import plot_log, write_log
from .config import TrainConfig
from .distributed import init_distributed, search_and_broadcast, set_cuda_precision
from .state import (CHECKPOINT_FORMAT, BatchStream, ModelEma, architecture_signature,  # noqa: F401
                    SeededItems, StreamBatches, resume_conflicts, rng_state, seed_everything, set_rng_state)

log = logging.getLogger(__name__)

#: side length of the embedded digits when the model does not ask for another (``data.load_digits``' default)
DIGITS_SIZE = 32

# ---------------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, progress: bool = False) -> nn.Module:
    """``Sequential(Normalize, net)`` named by ``cfg.model`` ("default" = the cached trained tiny ViT, or a
    timm model name, with timm's pretrained weights when ``cfg.pretrained``), started from ``cfg.init`` (a
    file or URL; EasyRobust / timm / torch formats, its EMA weights with ``cfg.init_ema``) when given."""
    from ..models import create_model

    return create_model(cfg.model, checkpoint=cfg.init, use_ema=cfg.init_ema, pretrained=cfg.pretrained,
                        num_classes=cfg.num_classes, progress=progress)


def data_image_size(cfg: TrainConfig, model: nn.Module) -> Optional[int]:
    """The side length the training images are resized to: ``cfg.image_size``, else the model's input size
    (timm's ``patch_embed.img_size`` or ``pretrained_cfg["input_size"]``, as timm's data config would), else
    None (folder images keep their size, the digits their 32x32). Refuses an ``image_size`` the model cannot
    take."""
    from ..models import input_size

    want = (input_size(model) or (3, None, None))[1]
    if cfg.image_size and want and cfg.image_size != want:
        raise NSPluginError(f"image_size {cfg.image_size} does not match the model's input size {want}; drop "
                            f"image_size (images are resized to {want}) or use a model for {cfg.image_size}")
    return cfg.image_size or want


def build_data(cfg: TrainConfig, model: nn.Module):
    """``(train_dataset, probe (x, y) or None)``: the embedded digits, or an ImageFolder root (with
    ``train/`` and optional ``val/`` subfolders, or the classes directly), both at the model's input size
    (:func:`data_image_size`)."""
    from ..data import image_folder, load_digits, tensors

    size = data_image_size(cfg, model)
    if cfg.data == "digits":
        if size and size != DIGITS_SIZE:
            log.info("the digits data is upsampled to %dx%d, the model's input size", size, size)
        s = load_digits(seed=0, image_size=size or DIGITS_SIZE)
        train = s.train
        probe = tensors(s.val, cfg.probe_size) if cfg.probe else None
    else:
        root = Path(cfg.data)
        if not root.is_dir():
            raise NSPluginError(f"data folder {root} does not exist; use data: digits or an ImageFolder root")
        from ..data import train_transform
        tr = root / "train" if (root / "train").is_dir() else root
        # one walk of the folder; decoding happens in the DataLoader's workers (see Trainer.train_batches)
        train = image_folder(tr, transform=train_transform(size, augment=cfg.augment, crop_pct=1.0)
                             if size else None)
        probe = None
        if cfg.probe and (root / "val").is_dir():
            probe = tensors(image_folder(root / "val", size), cfg.probe_size)
    if cfg.train_limit:
        from torch.utils.data import Subset, TensorDataset
        n = min(cfg.train_limit, len(train))
        if isinstance(train, TensorDataset):
            train = TensorDataset(*[t[:n] for t in train.tensors])
        else:
            train = Subset(train, range(n))
    return train, probe


def _check_data_classes(cfg: TrainConfig, model: nn.Module, train_set) -> Optional[List[str]]:
    """The training folder's class names, after checking they fit the model's outputs (before any work)."""
    from ..models import model_num_classes
    from ..validation import dataset_classes, match_classes
    classes = dataset_classes(train_set)
    if classes is None and cfg.data == "digits":
        classes = [str(i) for i in range(10)]
    if classes is None:
        return None
    n = model_num_classes(model)
    if cfg.data == "digits":
        where, fix = "the digits data", "start from a 10-class model (drop num_classes / use a 10-class checkpoint)"
    else:
        where = f"data folder {cfg.data}"
        fix = ("set num_classes to the folder's class count (a new head)" if cfg.model != "default"
               else "the embedded default has 10 classes: use a timm model with num_classes, or 10 class folders")
    idx = match_classes(classes, n, None, where=where, fix=fix)
    assert idx is None
    return classes


def _fetch(ds, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import TensorDataset
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][idx], ds.tensors[1][idx]
    items = [ds[int(i)] for i in idx]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


# ---------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------
class Trainer:
    """Runs ``cfg.method`` for ``cfg.rounds`` x ``cfg.steps_per_round`` steps; see the module docstring.

    Use :func:`train` rather than this class directly. ``model``/``train_set``/``probe`` default to what
    ``cfg`` names (:func:`build_model`, :func:`build_data`).
    """

    def __init__(self, cfg: TrainConfig, out: Optional[os.PathLike] = None, *, model: Optional[nn.Module] = None,
                 train_set=None, probe=None, resume: bool = False):
        from .._registry import trainers

        self.cfg = cfg.validate()
        self.out = Path(out) if out is not None else None
        self.rank, self.world, self.device = init_distributed()
        self.is_main = self.rank == 0
        if cfg.world_size is not None and cfg.world_size != self.world:
            raise NSPluginError(f"this config expects world_size {cfg.world_size} but the launch has {self.world} "
                                f"process(es); use torchrun --nproc_per_node {cfg.world_size} or set world_size")
        if cfg.batch_size % self.world:
            raise NSPluginError(f"batch_size {cfg.batch_size} is not divisible by the world size {self.world}")
        method_cls = trainers.get(cfg.method)

        # --- checks before anything is written
        ckpt = None
        if self.out is not None:
            last = self.out / "last.pth"
            if resume:
                if not last.is_file():
                    raise NSPluginError(f"nothing to resume: {last} does not exist; run without --resume first")
                from ..checkpoint import read_checkpoint
                ckpt = read_checkpoint(last)
                if ckpt["meta"].get("format") != CHECKPOINT_FORMAT:
                    raise NSPluginError(f"{last} is not an ns_plugin training checkpoint; choose another --out")
            elif last.is_file() or (self.out / "model.pth").is_file():
                raise NSPluginError(f"{self.out} already holds a training run; pass --resume to continue it "
                                    f"or choose another --out")
        elif resume:
            raise NSPluginError("resume needs an output folder (--out DIR)")

        seed_everything(cfg.seed + self.rank)
        raw = model if model is not None else build_model(cfg, progress=cfg.progress and self.is_main)
        self.arch = architecture_signature(raw)
        if ckpt is not None:
            self._check_resume(ckpt["meta"])
        if train_set is None:
            train_set, p = build_data(cfg, raw)
            probe = p if probe is None else probe
        self.train_set, self.probe = train_set, probe
        if len(train_set) < 1:
            raise NSPluginError("the training set is empty")
        self.classes = _check_data_classes(cfg, raw, train_set)

        self.raw = raw.to(self.device).train()
        self.model: nn.Module = self.raw
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.raw, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ema = ModelEma(self.raw, cfg.model_ema_decay) if cfg.model_ema else None
        self.opt = torch.optim.AdamW(self.raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.rounds * cfg.steps_per_round
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total) if cfg.sched == "cosine"
                      else torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0))
        self.use_amp = bool(cfg.amp and self.device.type == "cuda")
        if cfg.amp and not self.use_amp:  # say so, and record what runs: the saved config says amp false
            import logging
            logging.getLogger(__name__).warning("amp: true needs CUDA; training on %s in fp32 (recorded as amp: "
                                                "false)", self.device)
            self.cfg = cfg = dataclasses_replace(cfg, amp=False)
        self.amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        # bf16 has fp32's range: no loss scaling (and no scaler's host sync) needed
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        if self.device.type == "cuda":
            set_cuda_precision(cfg.tf32)
        self.stream = BatchStream(len(train_set), cfg.batch_size, cfg.seed, self.rank, self.world)
        self.method = method_cls(cfg)
        self.method.setup(self)
        self.round = 0
        self.log: List[Dict[str, Any]] = []
        if ckpt is not None:
            self._load_state(ckpt)

    # --- helpers used by the methods ------------------------------------------------------------------
    def autocast(self):
        """Mixed precision for the training forward passes (``amp`` on CUDA, ``amp_dtype``)."""
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.use_amp else contextlib.nullcontext()

    def attack_autocast(self):
        """Mixed precision for the adversarial examples made during training (Madry, TRADES, DAT): bf16 only,
        since fp16 attack gradients would underflow without a loss scaler; fp32 otherwise."""
        bf16 = self.use_amp and self.amp_dtype == torch.bfloat16
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def workers(self) -> int:
        from ..data import default_workers
        return self.cfg.workers if self.cfg.workers is not None else default_workers()

    def train_batches(self):
        """Endless ``(x, y)`` training batches in the :class:`BatchStream` order. In-memory data is indexed
        directly; folders go through a DataLoader (``workers`` decoding processes, pinned memory on CUDA,
        per-sample seeded augmentation). ``stream.batches`` counts the batches consumed (the resume point)."""
        from torch.utils.data import TensorDataset
        from ..data import make_loader
        if isinstance(self.train_set, TensorDataset):
            while True:
                yield _fetch(self.train_set, self.stream.next())
        loader = make_loader(SeededItems(self.train_set), self.stream.local, workers=self.workers(),
                             device=self.device, batch_sampler=StreamBatches(self.stream))
        for batch in loader:
            self.stream.batches += 1
            yield batch

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def search_images(self, rnd: int) -> torch.Tensor:
        """``search_batch_size`` images for round ``rnd`` (seeded, the same on every rank)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + 104_729 + rnd)
        k = min(self.cfg.search_batch_size, len(self.train_set))
        idx = torch.randperm(len(self.train_set), generator=g)[:k]
        return _fetch(self.train_set, idx)[0].to(self.device)

    def search_data(self, rnd: int = 0):
        """What the noise search draws its minibatches from: the training images (arXiv:2403.10476 Alg. 1
        line 5); for folders a shuffled DataLoader (seeded by the round) with decoding workers."""
        from torch.utils.data import TensorDataset
        from ..data import make_loader
        if isinstance(self.train_set, TensorDataset):
            return self.train_set.tensors[0]
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + 15_485_863 + rnd)
        return make_loader(self.train_set, self.cfg.search_batch_size, workers=self.workers(), device=self.device,
                           shuffle=True, generator=g, drop_last=len(self.train_set) > self.cfg.search_batch_size)

    def find_noise(self, rnd: int, init: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The ε-approximate noise for round ``rnd`` (arXiv:2403.10476 Eq. 8), each search step on a fresh minibatch of
        ``search_batch_size`` training images: searched on rank 0 in fp32 and eval mode with the unwrapped
        model, then broadcast to every rank."""
        data = self.search_data(rnd) if self.is_main else None
        confirm = self.confirm_images() if self.is_main else None
        return search_and_broadcast(self.raw, data, self.cfg, rnd, init=init, world=self.world, rank=self.rank,
                                    device=self.device, confirm=confirm)

    def confirm_images(self) -> Optional[torch.Tensor]:
        """``stop_confirm_batches`` x ``search_batch_size`` fixed training images (seeded by the run's seed, the
        same every round) on which a candidate stop of the noise search must hold too; None when off."""
        k = self.cfg.stop_confirm_batches
        if not k:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + 15_485_863)
        n = min(k * self.cfg.search_batch_size, len(self.train_set))
        idx = torch.randperm(len(self.train_set), generator=g)[:n]
        return _fetch(self.train_set, idx)[0]

    def heldout_images(self) -> Optional[torch.Tensor]:
        """Up to ``heldout_size`` held-out images (never trained on, never used by the search): the digits'
        validation split, or ``val/`` of a data folder; None when there are none or ``heldout_size`` is 0.
        Every NS-style round logs its noise's MSE probability on them (``heldout_mse_prob``)."""
        if not hasattr(self, "_heldout"):
            self._heldout = None
            n = self.cfg.heldout_size
            if n:
                from ..data import image_folder, load_digits, tensors
                size = data_image_size(self.cfg, self.raw)
                if self.cfg.data == "digits":
                    self._heldout = load_digits(seed=0, image_size=size or DIGITS_SIZE).val.tensors[0][:n]
                elif (Path(self.cfg.data) / "val").is_dir():
                    self._heldout = tensors(image_folder(Path(self.cfg.data) / "val", size), n)[0]
        return self._heldout

    @torch.no_grad()
    def mse_prob(self, noise: torch.Tensor, rnd: int = 0) -> float:
        """arXiv:2403.10476 Alg. 1 line 8: mean over the round's search images of ‖softmax(z') − softmax(z)‖²."""
        from ..anatomy import inject_noise
        from ..nullspace.metrics import mse_prob

        x = self.search_images(rnd)
        was = self.raw.training
        self.raw.eval()
        try:
            clean = self.raw(x)
            with inject_noise(self.raw, noise.to(self.device)):
                noisy = self.raw(x)
        finally:
            self.raw.train(was)
        return float(mse_prob(noisy, clean))

    # --- the loop -------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        """One model step with the method's loss (AMP, clipping, EMA included)."""
        cfg = self.cfg
        loss, parts = self.method.loss(self, x, y)
        self.zero_grad()
        self.scaler.scale(loss).backward()
        if cfg.clip_grad:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.raw)
        return dict(parts, loss=loss.detach())   # device tensors: no host sync per step

    def run(self) -> Dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.is_main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main and self.round == 0 and cfg.probe and self.probe is not None:
            self.log.append(dict(round=0, step=0, method=cfg.method, **self.run_probe()))
        bar = tqdm(total=cfg.rounds, initial=self.round, desc=f"train {cfg.method}",
                   disable=not (cfg.progress and self.is_main), leave=False)
        batches = self.train_batches()
        try:
            self._rounds(batches, bar)
        finally:
            batches.close()   # stops the DataLoader's workers
        bar.close()
        return self.finish()

    def _rounds(self, batches, bar) -> None:
        cfg = self.cfg
        while self.round < cfg.rounds:
            t0 = time.time()
            row: Dict[str, Any] = {"round": self.round + 1}
            row.update(self.method.begin_round(self, self.round))
            sums: Dict[str, torch.Tensor] = {}
            self.raw.train()
            for _ in range(cfg.steps_per_round):
                x, y = next(batches)
                parts = self.step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                for k, v in parts.items():
                    sums[k] = sums[k] + v.float() if k in sums else v.float()
            keys = sorted(sums)   # one host sync per round (the log row), none per step
            means = (torch.stack([sums[k] for k in keys]) / cfg.steps_per_round).tolist()
            parts = dict(zip(keys, means))
            if not all(math.isfinite(v) for v in means):
                raise NSPluginError(f"the {cfg.method} loss became {parts.get('loss')} in round {self.round + 1}; "
                                    f"lower lr or enable clip_grad")
            if self.world > 1:
                import torch.distributed as dist
                keys = sorted(parts)
                t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=self.device)
                dist.all_reduce(t)
                parts = dict(zip(keys, (t / self.world).tolist()))
            self.round += 1
            row.update({"step": self.round * cfg.steps_per_round, "method": cfg.method,
                        "lr": self.opt.param_groups[0]["lr"], **parts})
            if self.is_main and cfg.probe and self.probe is not None:
                row.update(self.run_probe())
            row["seconds"] = time.time() - t0
            self.log.append(row)
            self.save_last()
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "noise_norm") if k in row})

    @torch.no_grad()
    def run_probe(self) -> Dict[str, float]:
        """Held-out probe: clean accuracy and FGSM (ε 1/255, as arXiv:2403.10476 App. C) accuracy of the current model."""
        import torchattacks

        from ..models import accuracy

        x, y = self.probe
        out = {"probe_clean_acc": accuracy(self.raw, x, y)}
        was = self.raw.training
        self.raw.eval()
        with torch.enable_grad():
            atk = torchattacks.FGSM(self.raw, eps=1 / 255)
            adv = torch.cat([atk(x[i:i + 128].to(self.device), y[i:i + 128].to(self.device)).cpu()
                             for i in range(0, len(x), 128)])
        self.zero_grad()
        self.raw.train(was)
        out["probe_fgsm_acc"] = accuracy(self.raw, adv, y)
        return out

    # --- checkpoints ------------------------------------------------------------------------------------
    def _meta(self) -> Dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "method": self.cfg.method, "arch": self.arch,
                "model": self.cfg.model, "world_size": self.world, "round": self.round,
                "rounds": self.cfg.rounds, "config": self.cfg.to_dict(), "classes": self.classes}

    def _gather_rng(self) -> List[Dict[str, Any]]:
        st = rng_state(self.device)
        if self.world == 1:
            return [st]
        import torch.distributed as dist
        allst: List[Any] = [None] * self.world
        dist.all_gather_object(allst, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()})
        return allst

    def save_last(self) -> None:
        """Write ``out/last.pth`` atomically (rank 0; every rank's RNG state is gathered first)."""
        rng = self._gather_rng()
        if not self.is_main or self.out is None:
            return
        from ..checkpoint import save_checkpoint

        save_checkpoint(self.out / "last.pth", self.raw, ema=self.ema.module if self.ema else None, meta=self._meta(),
                        optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                        scaler=self.scaler.state_dict(), method_state=self.method.state_dict(),
                        stream={"batches": self.stream.batches}, rng=rng, log=self.log)
        self.write_log()

    def _check_resume(self, meta: Dict[str, Any]) -> None:
        last = self.out / "last.pth"
        if meta.get("method") != self.cfg.method:
            raise NSPluginError(f"{last} is a {meta.get('method')!r} run but this is {self.cfg.method!r}; "
                                f"resume with --method {meta.get('method')} or choose another --out")
        if meta.get("arch") != self.arch:
            raise NSPluginError(f"{last} was saved for another architecture ({meta.get('model')!r}); "
                                f"use the same model as that run or choose another --out")
        if meta.get("world_size") != self.world:
            raise NSPluginError(f"{last} was written by {meta.get('world_size')} process(es) but this launch has "
                                f"{self.world}; resume with torchrun --nproc_per_node {meta.get('world_size')}")
        diff = resume_conflicts(meta.get("config", {}) or {}, self.cfg.to_dict())
        if diff:
            was = ", ".join(f"{k}={a!r}" for k, (a, _) in diff.items())
            new = ", ".join(f"{k}={b!r}" for k, (_, b) in diff.items())
            raise NSPluginError(f"cannot resume {last}: it was run with {was} but now {new}; resume with the same "
                                f"settings, or start fresh with another --out (or delete {self.out})")

    def _load_state(self, ckpt: Dict[str, Any]) -> None:
        from ..checkpoint import load_into

        load_into(self.raw, ckpt["state_dict"], source="last.pth")
        if self.ema is not None:
            if not isinstance(ckpt.get("state_dict_ema"), dict):
                raise NSPluginError("last.pth has no EMA weights but model_ema is on; resume with model_ema: false")
            load_into(self.ema.module, ckpt["state_dict_ema"], source="last.pth (EMA)")
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        ms = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
              for k, v in (ckpt.get("method_state") or {}).items()}
        self.method.load_state_dict(ms)
        self.stream.batches = int(ckpt["stream"]["batches"])
        self.round = int(ckpt["meta"]["round"])
        self.log = list(ckpt.get("log") or [])
        set_rng_state(ckpt["rng"][self.rank], self.device)

    def finish(self) -> Dict[str, Any]:
        """Write the final safe ``model.pth`` (+ EMA), the log and the plot; return a summary."""
        summary = {"method": self.cfg.method, "rounds": self.round, "steps": self.stream.batches,
                   "log": self.log}
        if self.is_main and self.out is not None:
            from ..checkpoint import save_checkpoint

            meta = self._meta()
            meta["final"] = {k: v for k, v in (self.log[-1] if self.log else {}).items()
                             if isinstance(v, (int, float, str, bool))}
            save_checkpoint(self.out / "model.pth", self.raw, ema=self.ema.module if self.ema else None, meta=meta)
            self.write_log()
            if self.cfg.plot and self.log:
                plot_log(self.log, self.out / "fig4.png", title=f"{self.cfg.method}")
            summary["out"] = str(self.out)
        return summary

    def write_log(self) -> None:
        if self.out is not None and self.is_main:
            write_log(self.log, self.out)


def train(cfg: TrainConfig, out: Optional[os.PathLike] = None, *, resume: bool = False,
          model: Optional[nn.Module] = None, train_set=None, probe=None) -> Dict[str, Any]:
    """Fine-tune with ``cfg.method`` (see :mod:`ns_plugin.training.methods`); returns a summary with the
    per-round ``log``. With ``out``: ``out/last.pth`` (resumable), ``out/model.pth`` (safe, final),
    ``out/log.csv``, ``out/log.json`` and ``out/fig4.png``. ``resume=True`` continues from ``out``."""
    from ..io import claim_output

    cfg.validate()
    if resume and out is None:
        raise NSPluginError("resume needs an output folder (--out DIR)")
    # only rank 0 writes into `out`; it owns the folder for the whole run (a second writer fails at once)
    owner = out is not None and int(os.environ.get("RANK", "0")) == 0
    with claim_output(out, what=f"ns-plugin train ({cfg.method})", enabled=owner):
        t = Trainer(cfg, out, model=model, train_set=train_set, probe=probe, resume=resume)
        summary = t.run()
    summary["model"] = t.raw
    summary["ema"] = t.ema.module if t.ema else None
    return summary
