"""Helpers shared by the nullspace noise searches and metrics (:mod:`.search`, :mod:`.metrics`,
:mod:`.regularized`): the search record, random draws, frozen models, batch streams and clean/noisy forwards.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import NSPluginError


@dataclass
class NoiseRecord:
    """What one noise search did.

    ``steps``: noise updates made; ``checks``: stop tests (one per batch drawn); ``mse_prob``: the MSE
    probability of the returned noise on the last batch; ``reached``: ``mse_prob < eps``; ``norm``: Frobenius
    norm of the returned noise; ``init``: ``'uniform'`` (fresh U(-lim, lim)) or ``'warm'``; ``init_norm``:
    norm of the starting point after any expansion; ``expansions``: how many times the warm start was
    scaled by ``expand``; ``history``: δ at every stop test; ``losses``: the logit loss at every update;
    ``confirm_mse_prob``: with a ``confirm`` set, δ of the returned noise on it (``None`` without one);
    ``confirm_checks``: how many candidate stops were tested on it.
    """
    steps: int
    mse_prob: float
    norm: float
    reached: bool
    seconds: float
    init: str
    eps: float
    lim: float
    lr: float
    mode: str
    level: str = "encoder"
    checks: int = 0
    expansions: int = 0
    init_norm: float = 0.0
    objective: str = "eps-search"
    confirm_mse_prob: Optional[float] = None
    confirm_checks: int = 0
    history: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)

    def to_dict(self, history: bool = False) -> Dict[str, Any]:
        d = asdict(self)
        if not history:
            d.pop("history")
            d.pop("losses")
        return d


def _generator(generator) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise NSPluginError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")


def _gen_device(g: Optional[torch.Generator]) -> torch.device:
    """Where random numbers are drawn: the generator's own device (CPU when there is none)."""
    return g.device if g is not None else torch.device("cpu")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _prepare(model: nn.Module, generator):
    """``(generator, unwrapped model, its device)`` for a search: the generator from an int seed, the model
    without DDP/DataParallel wrappers (never search through DDP: its forward runs collectives)."""
    from ..models import strip_parallel
    g = _generator(generator)
    net = strip_parallel(model)
    return g, net, _device(net)


def _positive(name: str, value, *, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive finite number"
        raise NSPluginError(f"{name} must be {kind}, got {value!r}")


@contextlib.contextmanager
def frozen(model: nn.Module, *, eval_mode: bool = True):
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter, restoring both flags
    (per module / per parameter) on exit, also on exceptions.  Parameter ``.grad`` fields are untouched."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def _first_tensor(batch, where: str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("image", "images", "x", "input", "inputs"):
            if isinstance(batch.get(k), torch.Tensor):
                return batch[k]
    raise NSPluginError(f"{where} yielded a {type(batch).__name__}; expected image batches x or (x, y) pairs")


class _Batches:
    """Cycle through ``data`` (image tensor, ``(x, y)`` tensors, Dataset, DataLoader or re-iterable of
    ``x`` / ``(x, y)`` batches) forever, yielding image batches on ``device``."""

    def __init__(self, data, model: nn.Module, batch_size: int, generator: Optional[torch.Generator]):
        from ..models import check_images
        from torch.utils.data import DataLoader, Dataset, TensorDataset

        self.model, self.device, self.generator, self.bs = model, _device(model), generator, int(batch_size)
        self.x: Optional[torch.Tensor] = None
        self.loader = None
        if isinstance(data, (tuple, list)) and len(data) in (1, 2) and isinstance(data[0], torch.Tensor) \
                and data[0].dim() == 4:
            data = data[0]
        if isinstance(data, TensorDataset):
            data = data.tensors[0]
        if isinstance(data, torch.Tensor):
            check_images(data, model, what="search images")
            if len(data) == 0:
                raise NSPluginError("search images are empty; pass at least one image")
            self.x = data
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            if len(data) == 0:
                raise NSPluginError("the search data set is empty; pass at least one image")
            cpu_g = generator if generator is None or generator.device.type == "cpu" else None
            self.loader = DataLoader(data, batch_size=self.bs, shuffle=True, generator=cpu_g)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            if iter(data) is data:
                raise NSPluginError("search data is a one-shot iterator; pass a DataLoader, a list of batches or "
                                    "an image tensor so that it can be cycled")
            self.loader = data
        else:
            raise NSPluginError(f"search data must be an image tensor (N, C, H, W), a Dataset, a DataLoader or an "
                                f"iterable of batches, got {type(data).__name__}")
        # a generator that does not hold ``self``: no reference cycle, so a DataLoader iterator with workers is
        # released (its workers stopped) as soon as the search drops this object, never later by the cyclic
        # garbage collector in some forked process ("AssertionError: can only test a child process")
        self._it = _stream(self.x, self.loader, self.model, self.device, self.generator, self.bs)

    def __next__(self) -> torch.Tensor:
        return next(self._it)


def _stream(x: Optional[torch.Tensor], loader, model: nn.Module, device, generator, bs: int) -> Iterator[torch.Tensor]:
    """The batches of :class:`_Batches`, cycled forever."""
    from ..models import check_images
    if x is not None:
        n = len(x)
        while True:
            perm = torch.randperm(n, generator=generator, device=_gen_device(generator))
            perm = perm.to(x.device)
            for i in range(0, n, bs):
                yield x[perm[i:i + bs]].to(device)
    while True:
        got = 0
        for batch in loader:
            xb = _first_tensor(batch, "search data")
            check_images(xb, model, what="search images")
            got += 1
            yield xb.to(device)
        if got == 0:
            raise NSPluginError("search data yielded no batches; pass a non-empty data set")


def uniform_noise(shape: Sequence[int], lim: float = 3.0, *, generator=None,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """``U(-lim, lim)`` noise of ``shape`` (Alg. 1 line 3), drawn with ``generator`` (on its device, the CPU
    without one) for reproducibility and moved to ``device``."""
    _positive("lim", lim)
    g = _generator(generator)
    v = torch.rand(tuple(shape), generator=g, dtype=torch.float32, device=_gen_device(g)) * (2 * lim) - lim
    return v.to(device=device or "cpu", dtype=dtype)


def permuted(noise: torch.Tensor, *, generator=None) -> torch.Tensor:
    """The same values as ``noise`` at randomly permuted positions (the control of arXiv:2403.10476 Fig. 3)."""
    g = _generator(generator)
    flat = noise.detach().reshape(-1)
    idx = torch.randperm(flat.numel(), generator=g, device=_gen_device(g)).to(flat.device)
    return flat[idx].reshape(noise.shape)


def _level_of(noise: torch.Tensor) -> str:
    if not isinstance(noise, torch.Tensor):
        raise NSPluginError(f"noise must be a tensor, got {type(noise).__name__}")
    if noise.dim() == 3:
        return "encoder"
    if noise.dim() == 4:
        return "input"
    raise NSPluginError(f"noise must be (1, N_patches, D) (encoder level) or (1, C, H, W) (input level), "
                        f"got shape {tuple(noise.shape)}")


def _check_input_noise(model: nn.Module, noise: torch.Tensor, image_shape: Sequence[int], what="noise") -> None:
    want = (1, *image_shape)
    if tuple(noise.shape) != want:
        raise NSPluginError(f"{what} has shape {tuple(noise.shape)} but the input-level noise for these images "
                            f"must be {want} = (1, C, H, W)")
    if not noise.is_floating_point() or not bool(torch.isfinite(noise.detach()).all()):
        raise NSPluginError(f"{what} must be a finite floating-point tensor")


class _Forward:
    """Clean / noisy logits for one level and mode.

    ``pair(x, v)`` returns ``(clean, noisy)`` with ``clean`` computed without autograd and ``noisy`` with a
    graph to ``v`` only (parameters are frozen by the caller)."""

    def __init__(self, model: nn.Module, level: str, mode: str):
        from ..anatomy import ViTAnatomy, inject_noise
        from ..models import strip_parallel
        self.net = strip_parallel(model)  # never go through DDP: its forward runs collectives
        self.level, self.mode = level, mode
        self.inject = inject_noise
        self.anat = None
        if level == "encoder" and mode == "fast":
            try:
                self.anat = ViTAnatomy(self.net)
            except NSPluginError:
                self.anat = None  # patch_embed present but not a VisionTransformer: use the hook

    def noisy(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.level == "input":
            return self.net(x + v)
        with self.inject(self.net, v):
            return self.net(x)

    def pair(self, x: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.anat is not None:
            with torch.no_grad():
                u = self.anat.embed(x)
                clean = self.anat.head(self.anat.encode(u))
            return clean, self.anat.head(self.anat.encode(u, v))
        with torch.no_grad():
            clean = self.net(x)
        return clean, self.noisy(x, v)


def _diverged(step: int, lr: float, lim: float) -> NSPluginError:
    return NSPluginError(f"noise search diverged at step {step} (non-finite loss or noise); "
                         f"lower lr (now {lr}) or lim (now {lim})")
