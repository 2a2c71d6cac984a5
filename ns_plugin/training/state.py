"""Training state that makes a run resumable and reproducible: the model EMA, the architecture signature a
resume is checked against, the deterministic batch order, and every RNG's state (torch, CUDA, Python, NumPy
as weights_only-loadable tensors).
"""
from __future__ import annotations

import copy
import hashlib
import random
from typing import Any, Dict

import torch
from torch import nn

CHECKPOINT_FORMAT = "ns_plugin.train.v1"
#: Config keys that may differ when a run is resumed: they cannot change its result (progress bars, the final
#: plot drawn from the log). Every other key is compared with the checkpoint's ("resume refuses what it
#: cannot honour"), including keys added to TrainConfig later.
RESUME_FREE = ("progress", "plot")


def resume_conflicts(old: Dict[str, Any], now: Dict[str, Any]) -> Dict[str, tuple]:
    """``{key: (checkpoint value, new value)}`` for every result-affecting setting that differs (keys the old
    checkpoint does not record are not compared; 1 and 1.0 are equal)."""
    def same(a, b):
        num = (int, float)
        if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
            return float(a) == float(b)
        return a == b
    return {k: (old[k], v) for k, v in now.items() if k not in RESUME_FREE and k in old and not same(old[k], v)}


class ModelEma:
    """Exponential moving average of a model's weights (float tensors; other buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            s = src[k].detach()
            if v.dtype.is_floating_point:
                v.mul_(self.decay).add_(s.to(v.dtype), alpha=1 - self.decay)
            else:
                v.copy_(s)


def architecture_signature(model: nn.Module) -> str:
    """A short hash of the state-dict keys and shapes: equal for the same architecture."""
    from ..checkpoint import state_dict_of

    sd = state_dict_of(model)
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(sd.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class BatchStream:
    """Deterministic, resumable order of training indices: epochs of seeded permutations concatenated;
    global batch ``i`` is positions ``[i*B, (i+1)*B)`` of that sequence, and rank ``r`` of ``W`` takes
    the ``r``-th slice of it. The state is a single counter."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.local = batch_size // world
        self.batches = 0
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def next(self) -> torch.Tensor:
        start = self.batches * self.batch_size + self.rank * self.local
        pos = torch.arange(start, start + self.local)
        out = torch.empty(self.local, dtype=torch.long)
        for e in pos.div(self.n, rounding_mode="floor").unique().tolist():
            m = pos.div(self.n, rounding_mode="floor") == e
            out[m] = self._perm(int(e))[pos[m] % self.n]
        self.batches += 1
        return out


def rng_state(device: torch.device) -> Dict[str, Any]:
    import numpy as np

    py = random.getstate()
    npst = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "python": torch.tensor(list(py[1]), dtype=torch.int64), "python_version": int(py[0]),
          "numpy": torch.from_numpy(npst[1].astype("int64")), "numpy_pos": int(npst[2]),
          "numpy_has_gauss": int(npst[3]), "numpy_gauss": float(npst[4])}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"].to(torch.uint8).cpu())
    random.setstate((st["python_version"], tuple(int(v) for v in st["python"].tolist()), None))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype("uint32"), st["numpy_pos"],
                         st["numpy_has_gauss"], st["numpy_gauss"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def round_seed(seed: int, rnd: int, purpose: int) -> int:
    """The seed of round ``rnd``'s random draws for ``purpose`` (1: the noise search's init and data order,
    2: the random-noise ablation's Gaussian): the same on every rank and on resume."""
    return (int(seed) * 1_000_003 + rnd * 101 + purpose) % (2 ** 63)
