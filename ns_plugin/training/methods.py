"""Training methods: small objects that plug a loss (and, for NS, a noise) into the one shared loop.

A method sees the :class:`ns_plugin.training.loop.Trainer` ``t`` and uses

- ``t.model`` (possibly DDP-wrapped: use it for the loss that is back-propagated),
- ``t.raw`` (the unwrapped model: use it for attacks and the noise search, which are local),
- ``t.autocast()`` (AMP on CUDA, a no-op otherwise), ``t.cfg`` (:class:`TrainConfig`),
- ``t.find_noise(round, init)`` (the ε-approximate noise search, identical on every rank).

Registered in :data:`ns_plugin._registry.trainers`:

========== =====================================================================================
standard   CE(clean): plain fine-tuning with the same schedule (the baseline of arXiv:2403.10476 Table 2)
ns         arXiv:2403.10476 Alg. 1: per round a noise search to the ε boundary, then S steps of
           CE(clean) + CE(clean + noise) (noise added to the patch tokens, arXiv:2403.10476 Eq. 6)
random     arXiv:2403.10476 Table 4 ablation as in the paper and the authors' code: N(0, 1) token noise shrunk ×0.8
           until its MSE probability on the round's search batch is < ε (ε-noise, random direction)
random_norm a different experiment: Gaussian token noise with the norm of this round's learnt noise
           (harmful noise of the same size; its MSE probability is far above ε)
madry      PGD adversarial training (Madry et al. 2018), L∞ 8/255, step 2/255, 10 steps, random start
trades     TRADES (Zhang et al. 2019): CE(clean) + β·KL(p(clean) ‖ p(adv)), KL-PGD inner maximisation
dat        Discrete Adversarial Training (Mao et al. 2022) as in EasyRobust's DAT example
dat_ns     DAT + the NS term (arXiv:2403.10476 Table 2, "ViT-B + DAT + NS")
========== =====================================================================================
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import NSPluginError
from .._registry import trainers
from .state import round_seed

Parts = Dict[str, float]


class Method:
    """Base class: CE on clean images. Subclasses override :meth:`loss` and, if they need a per-round
    quantity (a noise), :meth:`begin_round` plus :meth:`state_dict`/:meth:`load_state_dict`."""

    name = "method"
    uses_noise = False

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, t) -> None:
        """Called once, after the model is on its device (and wrapped in DDP)."""

    def begin_round(self, t, rnd: int) -> Dict[str, Any]:
        """Called at the start of round ``rnd`` (0-based); returns values for the round's log row."""
        return {}

    def loss(self, t, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Parts]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    # shared pieces -------------------------------------------------------------------------------
    @staticmethod
    def ce(t, x, y) -> torch.Tensor:
        with t.autocast():
            return F.cross_entropy(t.model(x), y)


@trainers.register("standard")
class Standard(Method):
    """Plain fine-tuning: CE(clean), with the same optimiser, schedule and rounds as the other methods."""

    name = "standard"

    def loss(self, t, x, y):
        loss = self.ce(t, x, y)
        return loss, {"ce_clean": float(loss.detach())}


class _NoiseMixin:
    """Per-round token noise (arXiv:2403.10476 Alg. 1 lines 3-14) and the CE(clean + noise) term (line 19).

    ``noise`` is what the loss uses; ``learnt`` is the last searched noise (the warm start of the next
    search; the same tensor as ``noise`` except for the random ablation)."""

    noise: Optional[torch.Tensor] = None
    learnt: Optional[torch.Tensor] = None

    def state_dict(self):
        cp = lambda v: None if v is None else v.detach().cpu().clone()  # noqa: E731
        return {"noise": cp(self.noise), "learnt": cp(self.learnt)}

    def load_state_dict(self, state):
        cp = lambda v: None if v is None else v.clone()  # noqa: E731
        self.noise, self.learnt = cp(state.get("noise")), cp(state.get("learnt"))

    def _learn(self, t, rnd: int) -> Dict[str, Any]:
        init = self.learnt if (self.cfg.use_warm_start and self.learnt is not None) else None
        noise, stats = t.find_noise(rnd, init=init)
        self.noise = self.learnt = noise
        stats["warm_start"] = init is not None
        return self._with_heldout(t, stats, noise)

    @staticmethod
    def _with_heldout(t, stats: Dict[str, Any], noise: torch.Tensor) -> Dict[str, Any]:
        """Add ``heldout_mse_prob``: the noise's MSE probability on the fixed held-out images, next to the
        stopping batch's ``mse_prob`` (below ε by construction, so not evidence that the noise is inside the
        ε-region in general)."""
        held = getattr(t, "heldout_images", None)     # a foreign script's context may have no held-out set
        x = held() if held is not None and getattr(t, "is_main", True) else None
        if x is not None:
            from ..nullspace.metrics import mse_probability
            stats["heldout_mse_prob"] = mse_probability(t.raw, x.to(t.device), noise)
        return stats

    def begin_round(self, t, rnd):
        return self._learn(t, rnd)

    def noisy_ce(self, t, x, y) -> torch.Tensor:
        from ..anatomy import inject_noise

        noise = self.noise.to(device=x.device)
        with t.autocast(), inject_noise(t.model, noise):
            return F.cross_entropy(t.model(x), y)


@trainers.register("ns")
class Nullspace(_NoiseMixin, Method):
    """NS-ViT (arXiv:2403.10476 Alg. 1): ε-approximate nullspace noise each round, loss CE(clean) + CE(clean + noise)."""

    name = "ns"
    uses_noise = True

    def loss(self, t, x, y):
        clean = self.ce(t, x, y)
        noisy = self.noisy_ce(t, x, y)
        return clean + noisy, {"ce_clean": float(clean.detach()), "ce_noise": float(noisy.detach())}


@trainers.register("random")
class RandomNoise(Nullspace):
    """arXiv:2403.10476 Table 4 ablation, as the paper ("ε noise sampled from a Gaussian") and the authors' code
    (``ns_mode='random'`` in their EasyRobust fork) do it.

    Each round: token noise ``r ~ N(0, 1)`` of shape ``(1, N_patches, D)``, multiplied by ``random_shrink``
    (0.8) until its MSE probability on the round's search batch is below ε (at most 500 shrinks); loss
    CE(clean) + CE(clean + r), as for ``ns``. The noise is then as harmless as the learnt one on that batch and
    only its direction differs, which is what the ablation isolates. Logged: ``random_shrinks`` (steps),
    ``mse_prob`` (the batch value, < ε), ``noise_norm`` and ``heldout_mse_prob``."""

    name = "random"
    max_shrinks = 500

    def begin_round(self, t, rnd):
        from ..anatomy import token_shape
        from ..nullspace.metrics import mse_probability

        g = torch.Generator().manual_seed(round_seed(self.cfg.seed, rnd, 2))
        n, d = token_shape(t.raw)
        noise = torch.randn(1, n, d, generator=g).to(t.device)   # same on every rank (same seed)
        x = t.search_images(rnd)
        delta = mse_probability(t.raw, x, noise)
        shrinks = 0
        while not delta < self.cfg.eps and shrinks < self.max_shrinks:
            noise = noise * self.cfg.random_shrink
            shrinks += 1
            delta = mse_probability(t.raw, x, noise)
        if not delta < self.cfg.eps:
            raise NSPluginError(f"random noise did not get below eps={self.cfg.eps} after {shrinks} shrinks "
                                f"(MSE probability {delta:.4g}); check the model")
        self.noise = noise
        stats = {"random_shrinks": shrinks, "mse_prob": delta, "noise_norm": float(noise.norm()),
                 "reached": True}
        return self._with_heldout(t, stats, noise)


@trainers.register("random_norm")
class RandomNormMatched(Nullspace):
    """A different experiment from arXiv:2403.10476 Table 4: CE(clean) + CE(clean + Gaussian token noise whose ℓ2 norm
    matches this round's learnt ε-approximate noise) (or ``random_norm`` when set, which skips the search).

    It tests "harmful noise of the same size": its MSE probability (logged as ``mse_prob``) is far above ε
    (0.6-1.2 against ε = 0.03 on the embedded default), unlike the paper's ε-noise ablation (``random``)."""

    name = "random_norm"

    def begin_round(self, t, rnd):
        from ..anatomy import token_shape

        if self.cfg.random_norm is None:
            stats = self._learn(t, rnd)          # the learnt noise only fixes the norm
            norm = stats["noise_norm"]
        else:
            stats, norm = {}, float(self.cfg.random_norm)
        g = torch.Generator().manual_seed(round_seed(self.cfg.seed, rnd, 2))
        n, d = token_shape(t.raw)
        direction = torch.randn(1, n, d, generator=g)   # same on every rank (same seed)
        self.noise = (direction * (norm / direction.norm())).to(t.device)
        stats = {("learnt_" + k if k.startswith(("noise_", "mse_", "heldout_")) else k): v
                 for k, v in stats.items()}
        stats["noise_norm"] = float(self.noise.norm())
        stats["mse_prob"] = t.mse_prob(self.noise, rnd)
        return self._with_heldout(t, stats, self.noise)


@trainers.register("madry")
class Madry(Method):
    """Madry PGD adversarial training: CE(adv) (+ w·CE(clean)), L∞ PGD 8/255, step 2/255, 10 steps.

    PGD with random start (torchattacks.PGD, ε 8/255, step 2/255, 10 steps by default);
    loss CE(adv) + ``madry_clean_weight``·CE(clean).
    The default weight 0 is classic Madry; 1 is the NS-ViT reference code's variant."""

    name = "madry"

    def setup(self, t):
        import torchattacks
        c = self.cfg
        self.attack = torchattacks.PGD(t.raw, eps=c.pgd_eps, alpha=c.pgd_alpha, steps=c.pgd_steps, random_start=True)

    def loss(self, t, x, y):
        adv = self.attack(x, y).detach()    # before any DDP forward of this step
        adv_ce = self.ce(t, adv, y)
        parts = {"ce_adv": float(adv_ce.detach())}
        loss = adv_ce
        if self.cfg.madry_clean_weight:
            clean = self.ce(t, x, y)
            loss = loss + self.cfg.madry_clean_weight * clean
            parts["ce_clean"] = float(clean.detach())
        return loss, parts


@trainers.register("trades")
class Trades(Method):
    """TRADES (Zhang et al. 2019): CE(clean) + β·KL(p(clean) ‖ p(adv)) with KL-PGD adversarial images.

    Adversarial images by KL-PGD from x + 0.001·N(0, I)
    (torchattacks.TPGD, ε 8/255, step 2/255, 10 steps); loss CE(clean) + β·KL(p(clean) ‖ p(adv)),
    β = ``trades_beta`` (default 6 as in the TRADES paper; the NS-ViT reference code used 1)."""

    name = "trades"

    def setup(self, t):
        import torchattacks
        c = self.cfg
        self.attack = torchattacks.TPGD(t.raw, eps=c.pgd_eps, alpha=c.pgd_alpha, steps=c.pgd_steps)

    def loss(self, t, x, y):
        adv = self.attack(x).detach()
        with t.autocast():
            both = t.model(torch.cat([x, adv]))
        clean_logits, adv_logits = both.float().chunk(2)
        ce = F.cross_entropy(clean_logits, y)
        kl = F.kl_div(F.log_softmax(adv_logits, 1), F.softmax(clean_logits, 1), reduction="batchmean")
        return ce + self.cfg.trades_beta * kl, {"ce_clean": float(ce.detach()), "kl_adv": float(kl.detach())}


def build_vqgan(name: str = "small", *, seed: int = 0, device=None):
    """EasyRobust's VQGAN (``easyrobust.third_party.vqgan.VQModel``) in eval mode, frozen.

    ``small`` is randomly initialised (seeded) for offline tests; ``openimages_f8_16384`` loads the
    pretrained checkpoint EasyRobust's DAT example uses (downloads it: needs network)."""
    from easyrobust.third_party.vqgan import VQModel

    from .config import VQGAN_CONFIGS

    if name not in VQGAN_CONFIGS:
        raise NSPluginError(f"unknown VQGAN config {name!r} (known: {', '.join(sorted(VQGAN_CONFIGS))})")
    spec = VQGAN_CONFIGS[name]
    import contextlib
    import io

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # VQModel prints its layer shapes
            vq = VQModel(dict(spec["ddconfig"]), n_embed=spec["n_embed"], embed_dim=spec["embed_dim"])
    finally:
        torch.random.set_rng_state(state)
    if spec["url"]:
        try:
            vq.init_from_ckpt(spec["url"])
        except Exception as e:  # noqa: BLE001 (network errors come in many types)
            raise NSPluginError(f"cannot load the VQGAN checkpoint {spec['url']} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:100] if str(e) else ''}); it needs network "
                                f"access once, or use vqgan: small") from None
    vq.eval().requires_grad_(False)
    return vq.to(device) if device is not None else vq


@trainers.register("dat")
class DAT(Method):
    """Discrete Adversarial Training (Mao et al. 2022): CE(x) + CE(VQGAN(x_adv)), as in EasyRobust's DAT.

    As EasyRobust's DAT example does it: x_rec = VQGAN(x); x_adv = one L2 PGD step on x_rec
    (EasyRobust's ``pgd_generator``, ε 0.1, lr 0.1,
    random start with probability 0.8, model in train mode); loss CE(x) + CE(VQGAN(x_adv))."""

    name = "dat"

    def setup(self, t):
        self.vq = build_vqgan(self.cfg.vqgan, seed=self.cfg.vqgan_seed, device=t.device)

    def dat_images(self, t, x, y) -> torch.Tensor:
        from easyrobust.attacks import pgd_generator
        from easyrobust.third_party.vqgan import reconstruct_with_vqgan

        c = self.cfg
        with torch.no_grad():
            xrec = reconstruct_with_vqgan(x, self.vq)
        adv = pgd_generator(xrec, y, t.raw, attack_type="L2", eps=c.dat_eps, attack_steps=c.dat_steps,
                            attack_lr=c.dat_lr, random_start_prob=c.dat_random_start_prob, use_best=False,
                            attack_criterion="regular", eval_mode=False)
        t.zero_grad()   # pgd_generator back-propagates into the parameters
        with torch.no_grad():
            return reconstruct_with_vqgan(adv.detach(), self.vq)

    def loss(self, t, x, y):
        adv = self.dat_images(t, x, y)     # before any DDP forward of this step
        clean = self.ce(t, x, y)
        dat = self.ce(t, adv, y)
        return clean + dat, {"ce_clean": float(clean.detach()), "ce_dat": float(dat.detach())}


@trainers.register("dat_ns")
class DATNullspace(_NoiseMixin, DAT):
    """DAT + NS (arXiv:2403.10476 Table 2): the DAT loss plus CE(clean + ε-approximate nullspace noise)."""

    name = "dat_ns"
    uses_noise = True

    def loss(self, t, x, y):
        dat_loss, parts = super().loss(t, x, y)  # the DAT terms, adversarial images first
        noisy = self.noisy_ce(t, x, y)
        return dat_loss + noisy, {**parts, "ce_noise": float(noisy.detach())}


def get_method(name: str):
    """The registered method class called ``name`` (unknown names list the known ones)."""
    return trainers.get(name)
