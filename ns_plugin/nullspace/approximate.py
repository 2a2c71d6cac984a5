"""Encoder-level ε-approximate nullspace noise (seed 001, §3.3-4, Eq. 4-8, Algorithm 1 lines 3-14).

The noise ``v`` (shape ``(1, N_patches, D)``) is added to the patch-embedding output of a ViT
(see :func:`ns_plugin.anatomy.inject_noise`).  The ε-approximate nullspace of Eq. 5 is the set of ``v``
whose influence on the output stays below ε; Eq. 6 wants the *largest* such noise, and Eq. 8 solves it
with an early-stopped descent: start from a large ``v ~ U(-lim, lim)``, minimise the logit distance
``L(v) = mean_i ||z'_i - z_i||^2`` (Alg. 1 line 12) with AdamW, and stop as soon as the "MSE probability"
``δ = mean_i ||softmax(z'_i) - softmax(z_i)||^2`` (line 8) drops below ε -- the noise is then close to the
boundary of the region.  Reference settings (NS-ViT code): lim 3, AdamW lr 0.1 (default betas, weight decay
0.01), ε 0.03, at most 3000 steps, model in eval mode and fp32.

Also here:

* :func:`search_input_noise` -- the same search at pixel level, for any model incl. CNNs (seed 000, §5.3).
* :func:`learn_noise_regularized` / :func:`lim_sweep` -- the λ-regularised objective of Eq. 4 (seed 001)
  with plain gradient descent and the sampling-limit sweep of seed 000, appendix A.1.
* :func:`mse_probability`, :func:`noise_quality` -- prediction match and MSE probability, with the
  permuted-noise control of seed 001 Fig. 3 (same values, shuffled positions).

Fast path (``mode="fast"``, the default): the model's parameters are frozen during the search (no
parameter gradients are computed or accumulated), the patch embedding of a batch is computed once and
shared by the clean and the noisy pass, clean logits are computed once per batch without autograd, and
the stop test reuses the noisy forward pass of the update.  ``mode="faithful"`` follows the reference
loop literally (a separate no-grad forward pair for the stop test, then clean and noisy full-model
forwards for the update).  Both produce the same noise for the same data order and init.
Warm start: ``init=previous_noise`` with ``expand=γ`` (default 1.1) first scales the previous noise by γ
once, and again while it stays inside the region, then descends back into it, so the result is reached
from outside and stays near the ε boundary (Eq. 6 wants the largest noise inside) at a fraction of the
steps of a fresh start (see ``benchmarks/noise_search.py``).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NSPluginError

__all__ = ["NoiseRecord", "search_noise", "search_input_noise", "mse_probability", "noise_quality",
           "learn_noise_regularized", "lim_sweep", "uniform_noise", "permuted"]

MODES = ("fast", "faithful")


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


# --------------------------------------------------------------------------------------------- helpers
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
        self._it = self._stream()

    def _stream(self) -> Iterator[torch.Tensor]:
        from ..models import check_images
        if self.x is not None:
            n = len(self.x)
            while True:
                perm = torch.randperm(n, generator=self.generator, device=_gen_device(self.generator))
                perm = perm.to(self.x.device)
                for i in range(0, n, self.bs):
                    yield self.x[perm[i:i + self.bs]].to(self.device)
        while True:
            got = 0
            for batch in self.loader:
                x = _first_tensor(batch, "search data")
                check_images(x, self.model, what="search images")
                got += 1
                yield x.to(self.device)
            if got == 0:
                raise NSPluginError("search data yielded no batches; pass a non-empty data set")

    def __next__(self) -> torch.Tensor:
        return next(self._it)


def uniform_noise(shape: Sequence[int], lim: float = 3.0, *, generator=None,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """``U(-lim, lim)`` noise of ``shape`` (Alg. 1 line 3), drawn with ``generator`` (on its device, the CPU
    without one) for reproducibility and moved to ``device``."""
    _positive("lim", lim)
    g = _generator(generator)
    v = torch.rand(tuple(shape), generator=g, dtype=torch.float32, device=_gen_device(g)) * (2 * lim) - lim
    return v.to(device=device or "cpu", dtype=dtype)


def permuted(noise: torch.Tensor, *, generator=None) -> torch.Tensor:
    """The same values as ``noise`` at randomly permuted positions (the control of seed 001 Fig. 3)."""
    g = _generator(generator)
    flat = noise.detach().reshape(-1)
    idx = torch.randperm(flat.numel(), generator=g, device=_gen_device(g)).to(flat.device)
    return flat[idx].reshape(noise.shape)


def _delta(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Alg. 1 line 8: batch mean of the summed squared softmax difference ("MSE probability")."""
    return (noisy.float().softmax(-1) - clean.float().softmax(-1)).pow(2).sum(-1).mean()


def _logit_loss(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Alg. 1 line 12: batch mean of the squared l2 distance of the logits."""
    return (noisy.float() - clean.float()).pow(2).sum(-1).mean()


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
        from ..anatomy import ViTAnatomy, inject_noise, strip_parallel
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


# ------------------------------------------------------------------------------------------ the search
def _search(model, data, *, level, eps, lim, lr, max_steps, init, expand, max_expand, batch_size,
            generator, mode, weight_decay, progress, desc, confirm=None) -> Tuple[torch.Tensor, NoiseRecord]:
    from tqdm.auto import tqdm
    from ..anatomy import check_noise, strip_parallel

    _positive("eps", eps)
    _positive("lim", lim)
    _positive("lr", lr)
    _positive("batch_size", batch_size, integer=True)
    if not (isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 0):
        raise NSPluginError(f"max_steps must be a non-negative integer, got {max_steps!r}")
    if mode not in MODES:
        raise NSPluginError(f"mode must be one of {MODES}, got {mode!r}")
    if expand is not None and not (isinstance(expand, (int, float)) and math.isfinite(expand) and expand >= 1):
        raise NSPluginError(f"expand must be None or a growth factor >= 1 (e.g. 1.1), got {expand!r}")
    if not (isinstance(max_expand, int) and not isinstance(max_expand, bool) and max_expand >= 0):
        raise NSPluginError(f"max_expand must be a non-negative integer, got {max_expand!r}")
    if weight_decay < 0:
        raise NSPluginError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(model, nn.Module):
        raise NSPluginError(f"expected a torch.nn.Module model, got {type(model).__name__}")
    g = _generator(generator)
    net = strip_parallel(model)
    dev = _device(net)
    t0 = time.perf_counter()
    with frozen(model):
        if level == "encoder":
            from ..anatomy import token_shape
            shape = (1, *token_shape(net))  # fails first, and clearly, for models without patch_embed
        batches = _Batches(data, net, batch_size, g)
        fwd = _Forward(net, level, mode)
        if level == "encoder":
            if init is not None:
                check_noise(net, init, what="init noise")
            first = None
        else:
            first = next(batches)
            shape = (1, *first.shape[1:])
            if init is not None:
                _check_input_noise(net, init, first.shape[1:], what="init noise")
        if init is None:
            v0, kind = uniform_noise(shape, lim, generator=g), "uniform"
        else:
            v0, kind = init.detach().float().clone(), "warm"
        v = v0.to(dev, torch.float32)

        if confirm is not None:
            from ..models import check_images
            if not isinstance(confirm, torch.Tensor) or confirm.dim() != 4 or len(confirm) == 0:
                raise NSPluginError("confirm must be a non-empty image tensor (N, C, H, W) in [0, 1]")
            check_images(confirm, net, what="confirm images")
        confirm_checks, confirm_d, confirm_at = 0, None, -1

        def confirmed(v_now) -> bool:
            """The stop rule that holds beyond one batch: δ < ε on the fixed ``confirm`` images too."""
            nonlocal confirm_checks, confirm_d, confirm_at
            if confirm is None:
                return True
            confirm_checks += 1
            confirm_at = steps
            num = 0.0
            with torch.no_grad():
                for i in range(0, len(confirm), batch_size):
                    xc = confirm[i:i + batch_size].to(dev)
                    c, n = fwd.pair(xc, v_now.detach())
                    num += float(_delta(n, c)) * len(xc)
            confirm_d = num / len(confirm)
            return confirm_d < eps

        def draw():
            nonlocal first
            if first is not None:
                x, first = first, None
                return x
            return next(batches)

        # warm start: scale up while still inside the region, so the descent ends near the boundary
        history: List[float] = []
        expansions = 0
        if kind == "warm" and expand is not None and expand > 1 and max_expand > 0:
            # always step out once (the descent should approach the boundary from outside, as a fresh
            # search from a large init does), then keep growing while the noise stays inside
            v = v * expand
            expansions = 1
            while expansions < max_expand:
                x = draw()
                with torch.no_grad():
                    clean, noisy = fwd.pair(x, v)
                    d = float(_delta(noisy, clean))
                if not math.isfinite(d):
                    raise _diverged(0, lr, lim)
                if d >= eps:
                    break
                v = v * expand
                expansions += 1
        init_norm = float(v.norm())

        v = v.clone().requires_grad_(True)
        opt = torch.optim.AdamW([v], lr=lr, weight_decay=weight_decay)
        losses: List[float] = []
        steps, reached, d = 0, False, float("nan")
        bar = tqdm(total=max_steps, desc=desc, disable=not progress, leave=False)
        try:
            while True:
                x = draw()
                if mode == "faithful":
                    # reference loop: stop test on its own no-grad forward pair ...
                    with torch.no_grad():
                        d_t = _delta(fwd.noisy(x, v), fwd.net(x))
                    d = float(d_t)
                    if math.isfinite(d) and ((d < eps and confirmed(v)) or steps >= max_steps):
                        history.append(d)
                        break
                    # ... then clean and noisy forwards again for the update
                    with torch.no_grad():
                        clean = fwd.net(x)
                    noisy = fwd.noisy(x, v)
                else:
                    clean, noisy = fwd.pair(x, v)
                    d = float(_delta(noisy.detach(), clean))
                    if math.isfinite(d) and ((d < eps and confirmed(v)) or steps >= max_steps):
                        history.append(d)
                        break
                history.append(d)
                if not math.isfinite(d):
                    raise _diverged(steps, lr, lim)
                loss = _logit_loss(noisy, clean)
                if not torch.isfinite(loss):
                    raise _diverged(steps, lr, lim)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                try:
                    opt.step()
                except RuntimeError as e:  # AdamW's own overflow check on absurd step sizes
                    if "overflow" not in str(e):
                        raise
                    raise _diverged(steps, lr, lim) from None
                steps += 1
                losses.append(float(loss.detach()))
                if not bool(torch.isfinite(v).all()):
                    raise _diverged(steps, lr, lim)
                bar.update(1)
                if progress:
                    bar.set_postfix(mse_prob=f"{d:.4f}", norm=f"{float(v.detach().norm()):.2f}")
        finally:
            bar.close()
        reached = d < eps
        noise = v.detach()
        if confirm is not None:
            if confirm_at != steps:      # stopped by the step cap: measure the returned noise once
                confirmed(noise)
                confirm_checks -= 1
            reached = reached and confirm_d < eps
    rec = NoiseRecord(steps=steps, mse_prob=d, norm=float(noise.norm()), reached=bool(reached),
                      seconds=time.perf_counter() - t0, init=kind, eps=float(eps), lim=float(lim), lr=float(lr),
                      mode=mode, level=level, checks=len(history), expansions=expansions, init_norm=init_norm,
                      confirm_mse_prob=confirm_d, confirm_checks=confirm_checks, history=history, losses=losses)
    return noise, rec


def search_noise(model: nn.Module, data, *, eps: float = 0.03, lim: float = 3.0, lr: float = 0.1,
                 max_steps: int = 3000, init: Optional[torch.Tensor] = None, expand: Optional[float] = 1.1,
                 max_expand: int = 30, batch_size: int = 128, generator=None, mode: str = "fast",
                 weight_decay: float = 0.01, progress: bool = False, confirm: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, NoiseRecord]:
    """Search an encoder-level ε-approximate nullspace noise (seed 001, Eq. 7-8, Algorithm 1 lines 3-14).

    Starting from ``v ~ U(-lim, lim)`` of shape ``(1, N_patches, D)`` (or from ``init``), repeat: draw a
    batch, compute clean logits ``z`` and noisy logits ``z'`` (noise added to the patch-embedding output),
    stop if ``δ = mean ||softmax(z') - softmax(z)||^2 < eps`` (checked before each update), else take an AdamW
    step on ``mean ||z' - z||^2``.  At most ``max_steps`` updates; after the last one the noise is tested
    once more, so ``record.mse_prob`` always describes the returned noise.

    Args:
        model: a ViT with a timm ``patch_embed`` (optionally ``Sequential(Normalize, vit)`` / DDP-wrapped).
            It is searched in eval mode with frozen parameters; its train/eval mode and ``requires_grad``
            flags are restored afterwards and no parameter ``.grad`` is touched.
        data: images in [0, 1]: an (N, C, H, W) tensor (shuffled into batches of ``batch_size`` every
            epoch with ``generator``), a Dataset, a DataLoader or a re-iterable of ``x`` or ``(x, y)``
            batches (cycled as needed).
        eps: the ε of the approximate nullspace (Eq. 5); 0.03 in the paper.
        lim: sampling limit of the uniform init (3 in the paper).
        lr: AdamW learning rate (0.1 in the paper); ``weight_decay`` is AdamW's default 0.01.
        max_steps: cap on noise updates (T = 3000 in the paper).
        init: a previous noise to warm-start from (``record.init == 'warm'``).
        expand: with ``init``, first multiply it by ``expand`` once, and again while it stays inside the region
            (at most ``max_expand`` multiplications, one batch per test), then descend: the result is reached
            from outside and ends near the ε boundary as a fresh search does (Eq. 6 wants the largest noise
            inside).  ``None``, 1 or ``max_expand=0`` disables the expansion.
        batch_size: batch size for tensor / Dataset data (B = 128 in the paper).
        generator: ``torch.Generator`` or int seed for the init and the data order (reproducible searches).
        mode: ``"fast"`` (default; shared patch embedding, one forward pair per step) or ``"faithful"`` (the
            reference loop with its extra forwards).  Same noise for the same data order and init.
        progress: tqdm progress bar.
        confirm: optional fixed images (e.g. 4 x ``batch_size`` training images): a stop that the batch test
            allows is taken only if δ on these images is below ε too, else the descent continues. The paper's
            rule (``None``) stops on one batch, so the returned noise is below ε on *that* batch, and on
            held-out images it is typically 2-5x above it; averaging over several batches removes most of the
            selection effect. Cost: one no-grad forward pass over ``confirm`` per candidate stop, plus the
            extra descent steps it asks for (``record.confirm_checks``, ``record.steps``).

    Returns:
        ``(noise, record)``: the noise (detached, float32, on the model's device) and a :class:`NoiseRecord`.
    """
    return _search(model, data, level="encoder", eps=eps, lim=lim, lr=lr, max_steps=max_steps, init=init,
                   expand=expand, max_expand=max_expand, batch_size=batch_size, generator=generator, mode=mode,
                   weight_decay=weight_decay, progress=progress, desc="nullspace noise", confirm=confirm)


def search_input_noise(model: nn.Module, data, *, eps: float = 0.03, lim: float = 3.0, lr: float = 0.1,
                       max_steps: int = 3000, init: Optional[torch.Tensor] = None, expand: Optional[float] = 1.1,
                       max_expand: int = 30, batch_size: int = 128, generator=None, mode: str = "fast",
                       weight_decay: float = 0.01, progress: bool = False) -> Tuple[torch.Tensor, NoiseRecord]:
    """The ε-approximate noise learnt at the *input* (pixel) level for the whole network, for any model
    including CNNs (seed 000, §5.2-5.3, Fig. 3(b): ``ṽ_ω``).  Same procedure and arguments as
    :func:`search_noise`; the noise has shape ``(1, C, H, W)`` and is added to the images in [0, 1] before
    the model's normalisation (the sum is not clipped: it is a probe of the network, not an image)."""
    return _search(model, data, level="input", eps=eps, lim=lim, lr=lr, max_steps=max_steps, init=init,
                   expand=expand, max_expand=max_expand, batch_size=batch_size, generator=generator, mode=mode,
                   weight_decay=weight_decay, progress=progress, desc="input-level noise")


# ------------------------------------------------------------------------------------------- metrics
def _noisy_logits(net: nn.Module, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    from ..anatomy import inject_noise
    if noise.dim() == 4:
        return net(x + noise)
    with inject_noise(net, noise):
        return net(x)


def _validate_noise(net: nn.Module, noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from ..anatomy import check_noise
    level = _level_of(noise)
    if level == "encoder":
        check_noise(net, noise)
    else:
        _check_input_noise(net, noise, x.shape[1:])
    return noise.detach().to(_device(net), torch.float32)


def _eval_logits(net, x, noises, batch_size):
    """Clean logits and the logits under each noise in ``noises``, batched, without autograd."""
    dev = _device(net)
    clean, noisy = [], [[] for _ in noises]
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            clean.append(net(xb).float().cpu())
            for k, v in enumerate(noises):
                noisy[k].append(_noisy_logits(net, xb, v).float().cpu())
    return torch.cat(clean), [torch.cat(n) for n in noisy]


def mse_probability(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, *, batch_size: int = 256) -> float:
    """MSE probability of ``noise`` on images ``x``: mean over images of
    ``||softmax(f(u + v)) - softmax(f(u))||^2`` (seed 001, Alg. 1 line 8; Fig. 3 and 5).  ``noise`` is
    encoder-level ``(1, N_patches, D)`` or input-level ``(1, C, H, W)``.  Computed in eval mode."""
    from ..anatomy import strip_parallel
    from ..models import check_images
    net = strip_parallel(model)
    check_images(x, net)
    v = _validate_noise(net, noise, x)
    with frozen(net):
        clean, (noisy,) = _eval_logits(net, x, [v], batch_size)
    return float(_delta(noisy, clean))


def noise_quality(model: nn.Module, noise: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                  generator=None, batch_size: int = 256) -> Dict[str, float]:
    """Quality of a learnt noise on held-out images (seed 001 Fig. 3(a), seed 000 Fig. 2).

    Returns ``n``, ``norm``, ``pred_match`` (% of images whose predicted class is unchanged by the noise),
    ``mse_prob``, the permuted-noise control (``permuted_pred_match``, ``permuted_mse_prob``: same values at
    shuffled positions, drawn with ``generator``) and, when labels ``y`` are given, ``clean_acc``,
    ``noisy_acc`` and ``permuted_acc`` (%)."""
    from ..anatomy import strip_parallel
    from ..models import check_images
    net = strip_parallel(model)
    check_images(x, net)
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        raise NSPluginError(f"labels must be a tensor with one label per image ({len(x)}), "
                            f"got {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    v = _validate_noise(net, noise, x)
    vp = permuted(v, generator=generator)
    with frozen(net):
        clean, (noisy, perm) = _eval_logits(net, x, [v, vp], batch_size)
    pc, pn, pp = clean.argmax(1), noisy.argmax(1), perm.argmax(1)
    out = dict(n=int(len(x)), norm=float(v.norm()),
               pred_match=100.0 * float((pn == pc).float().mean()), mse_prob=float(_delta(noisy, clean)),
               permuted_pred_match=100.0 * float((pp == pc).float().mean()),
               permuted_mse_prob=float(_delta(perm, clean)))
    if y is not None:
        y = y.cpu()
        out.update(clean_acc=100.0 * float((pc == y).float().mean()), noisy_acc=100.0 * float((pn == y).float().mean()),
                   permuted_acc=100.0 * float((pp == y).float().mean()))
    return out


# ----------------------------------------------------------------------------- Eq. 4 and the lim sweep
def learn_noise_regularized(model: nn.Module, data, *, lam: float = 0.0, lim: float = 1.0, lr: float = 0.01,
                            steps: int = 500, p: float = 2.0, milestones: Sequence[float] = (0.3, 0.6, 0.8),
                            level: str = "encoder", batch_size: int = 128, eps: float = 0.03, generator=None,
                            progress: bool = False) -> Tuple[torch.Tensor, NoiseRecord]:
    """Learn a noise with the λ-regularised objective of seed 001 Eq. 4 by plain gradient descent:
    ``L(v) = mean_i ||z'_i - z_i||_p - lam * log ||v||`` (``lam = 0`` gives seed 000's Eq. 6 / A.1 loss,
    the ℓ_p distance of the logits, not squared).

    As in seed 000, appendix A.1: ``v ~ U(-lim, lim)``, ``steps`` gradient steps of size ``lr`` (0.01 there),
    the step size divided by 10 at the given fractions of the run ([150, 300, 400] of 500 there).  No early
    stopping; ``record.reached`` tells whether the final noise is inside the ε region on the last batch
    (``eps`` is only used for that flag).  ``level="input"`` learns a pixel-level noise for any model.
    Parameters are frozen and the model's modes restored as in :func:`search_noise`.
    """
    from tqdm.auto import tqdm
    from ..anatomy import strip_parallel, token_shape

    for name, val in (("lim", lim), ("lr", lr), ("p", p), ("eps", eps)):
        _positive(name, val)
    _positive("steps", steps, integer=True)
    _positive("batch_size", batch_size, integer=True)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise NSPluginError(f"lam must be a finite number >= 0, got {lam!r}")
    if level not in ("encoder", "input"):
        raise NSPluginError(f"level must be 'encoder' or 'input', got {level!r}")
    g = _generator(generator)
    net = strip_parallel(model)
    dev = _device(net)
    t0 = time.perf_counter()
    with frozen(model):
        batches = _Batches(data, net, batch_size, g)
        fwd = _Forward(net, level, "fast")
        x = next(batches)
        shape = (1, *token_shape(net)) if level == "encoder" else (1, *x.shape[1:])
        v = uniform_noise(shape, lim, generator=g, device=dev).requires_grad_(True)
        init_norm = float(v.detach().norm())
        decay_at = {int(round(f * steps)) for f in milestones}
        step_size = float(lr)
        history, losses, d = [], [], float("nan")
        for t in tqdm(range(steps), desc="regularised noise", disable=not progress, leave=False):
            if t > 0:
                x = next(batches)
            if t in decay_at:
                step_size *= 0.1
            clean, noisy = fwd.pair(x, v)
            dist = (noisy.float() - clean.float()).abs().pow(p).sum(-1).pow(1.0 / p).mean()
            loss = dist - lam * torch.log(v.norm()) if lam > 0 else dist
            if not torch.isfinite(loss):
                raise _diverged(t, lr, lim)
            (grad,) = torch.autograd.grad(loss, [v])
            with torch.no_grad():
                v -= step_size * grad
            if not bool(torch.isfinite(v).all()):
                raise _diverged(t + 1, lr, lim)
            d = float(_delta(noisy.detach(), clean))
            history.append(d)
            losses.append(float(loss.detach()))
        with torch.no_grad():
            clean, noisy = fwd.pair(next(batches), v)
            d = float(_delta(noisy, clean))
        history.append(d)
        noise = v.detach()
    rec = NoiseRecord(steps=int(steps), mse_prob=d, norm=float(noise.norm()), reached=d < eps,
                      seconds=time.perf_counter() - t0, init="uniform", eps=float(eps), lim=float(lim), lr=float(lr),
                      mode="gradient-descent", level=level, checks=len(history), init_norm=init_norm,
                      objective=f"eq4(lam={lam}, p={p})", history=history, losses=losses)
    return noise, rec


def lim_sweep(model: nn.Module, train_data, x_eval: torch.Tensor, y_eval: Optional[torch.Tensor] = None, *,
              lims: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0), lam: float = 0.0,
              steps: int = 500, lr: float = 0.01, level: str = "encoder", batch_size: int = 128, seed: int = 0,
              progress: bool = False) -> List[Dict[str, float]]:
    """The sampling-limit sweep of seed 000, §4 and appendix A.1 (Fig. 2): for each ``lim``, learn a noise
    with :func:`learn_noise_regularized` from ``U(-lim, lim)`` and report its :func:`noise_quality` on the
    held-out images (prediction match and MSE probability, learnt vs permuted).  One row per ``lim``
    with ``lim``, ``steps``, ``train_mse_prob`` and the quality metrics."""
    if not lims:
        raise NSPluginError("lims is empty; pass at least one sampling limit")
    rows = []
    for i, lim in enumerate(lims):
        v, rec = learn_noise_regularized(model, train_data, lam=lam, lim=float(lim), lr=lr, steps=steps,
                                         level=level, batch_size=batch_size, generator=seed + i, progress=progress)
        q = noise_quality(model, v, x_eval, y_eval, generator=seed + i)
        rows.append(dict(lim=float(lim), steps=rec.steps, train_mse_prob=rec.mse_prob, **q))
    return rows


def _register() -> None:
    from ..registry import noise_generators
    noise_generators.register("approximate", search_noise)
    noise_generators.register("approximate-input", search_input_noise)
    noise_generators.register("regularized", learn_noise_regularized)


_register()
