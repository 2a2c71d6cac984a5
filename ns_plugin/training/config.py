"""Training configuration in EasyRobust's style: argparse flags whose defaults an optional YAML file sets.

EasyRobust's (and timm's) ``train.py`` parse ``--config FILE`` first, feed the YAML mapping to
``parser.set_defaults`` and then parse the remaining flags, so a flag on the command line beats the YAML
file, which beats the built-in default. :func:`parse_config` does the same, but refuses YAML keys that no
flag knows (a typo would otherwise be silently ignored) and validates the ranges.

Defaults follow the papers: seed ``arXiv:2403.10476`` appendix C (K = 20 rounds, S = 40 model steps per round,
ε = 0.03, lim = 3, noise lr 0.1, at most 3000 noise steps, AdamW lr 1e-5, cosine schedule, batch 128)
and ``NOTES.md`` on the reference code (weight decay 0.05, EMA 0.9998, PGD 8/255, 2/255, 10 steps).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Sequence

from ..errors import NSPluginError


@dataclass
class TrainConfig:
    """Every knob of :func:`ns_plugin.training.train`. Field comments name the paper setting."""
    # --- method and schedule (arXiv:2403.10476 Alg. 1 / App. C)
    method: str = "ns"                 #: registered trainer name (``ns_plugin._registry.trainers``)
    rounds: int = 20                   #: K outer rounds (checkpoint/log boundary for every method)
    steps_per_round: int = 40          #: S model steps per round
    batch_size: int = 128              #: global batch (split over DDP ranks)
    lr: float = 1e-5                   #: AdamW learning rate (model)
    weight_decay: float = 0.05
    sched: str = "cosine"              #: "cosine" (over all K*S steps) or "constant"
    clip_grad: Optional[float] = None  #: max gradient norm, None = no clipping
    model_ema: bool = False            #: keep an EMA copy of the weights (used for DAT+NS in arXiv:2403.10476 App. C)
    model_ema_decay: float = 0.9998
    amp: bool = False                  #: mixed precision on CUDA (the noise search stays fp32)
    seed: int = 0
    world_size: Optional[int] = None   #: expected DDP world size (None = whatever torchrun gives)
    # --- nullspace noise search (arXiv:2403.10476 Eq. 6-8, Alg. 1 lines 3-14)
    eps: float = 0.03                  #: ε threshold on the "MSE probability"
    lim: float = 3.0                   #: initial noise ~ U(-lim, lim)
    noise_lr: float = 0.1
    noise_max_steps: int = 3000        #: T, the cap on noise steps per round
    search: str = "fast"               #: "fast" or "faithful" (see ns_plugin.nullspace.search)
    search_batch_size: int = 128       #: minibatch size of the noise search (B = 128, a fresh batch per step)
    warm_start: Optional[bool] = None  #: start each round's search from the previous noise (expanded, then
                                       #: descended); None = True for search "fast", False for "faithful"
                                       #: (Alg. 1 line 3: fresh U(-lim, lim) every round)
    # --- random-noise ablation (arXiv:2403.10476 Table 4)
    random_norm: Optional[float] = None  #: fixed norm of the random noise; None = this round's learnt norm
    # --- PGD baselines (arXiv:2403.10476 Table 3)
    pgd_eps: float = 8 / 255
    pgd_alpha: float = 2 / 255
    pgd_steps: int = 10
    madry_clean_weight: float = 0.0    #: 0 = classic Madry CE(adv); 1 = the reference code's CE(clean)+CE(adv)
    trades_beta: float = 6.0           #: TRADES paper value (the NS-ViT reference code used 1.0)
    # --- DAT (Mao et al. 2022, EasyRobust's DAT example)
    vqgan: str = "small"               #: "small" (random, for tests) or "openimages_f8_16384" (downloads)
    vqgan_seed: int = 0
    dat_eps: float = 0.1               #: L2 radius of EasyRobust's one-step attack on the reconstruction
    dat_steps: int = 1
    dat_lr: float = 0.1
    dat_random_start_prob: float = 0.8
    # --- model and data
    model: str = "default"             #: "default" (embedded tiny ViT), or a timm model name
    pretrained: bool = False           #: timm pretrained weights (needs network the first time)
    checkpoint: Optional[str] = None   #: safe checkpoint to start from
    num_classes: Optional[int] = None
    data: str = "digits"               #: "digits" (embedded) or an ImageFolder root with class subfolders
    image_size: Optional[int] = None   #: resize folder images (default: the model's input size)
    train_limit: Optional[int] = None  #: use only the first N training images (quick runs)
    # --- logging
    probe: bool = False                #: per-round held-out probe (clean and FGSM-1/255 accuracy)
    probe_size: int = 256
    plot: bool = True                  #: write the Fig.-4-style plot at the end
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Raise :class:`NSPluginError` for out-of-range values (one line, naming the fix)."""
        from .._registry import trainers  # filled by ns_plugin.training (imported before this module)
        trainers.get(self.method)

        def num(name, lo, hi, lo_open=True, hi_open=False):
            v = getattr(self, name)
            if v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise NSPluginError(f"{name} must be a finite number, got {v!r}")
            bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi)
            if bad:
                lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
                raise NSPluginError(f"{name}={v} is out of range; use a value in {lb}{lo}, {hi}{rb}")

        num("eps", 0, 2)  # the MSE probability of two softmax vectors is at most 2
        num("lr", 0, 1)
        num("noise_lr", 0, 100)
        num("lim", 0, 1e4)
        num("weight_decay", 0, 10, lo_open=False)
        num("model_ema_decay", 0, 1, hi_open=True)
        num("pgd_eps", 0, 1)
        num("pgd_alpha", 0, 1)
        num("trades_beta", 0, 1e4, lo_open=False)
        num("madry_clean_weight", 0, 1e4, lo_open=False)
        num("dat_eps", 0, 1e3)
        num("dat_lr", 0, 1e3)
        num("dat_random_start_prob", 0, 1, lo_open=False)
        num("clip_grad", 0, 1e9)
        num("random_norm", 0, 1e9)
        for name in ("rounds", "steps_per_round", "batch_size", "noise_max_steps", "search_batch_size",
                     "pgd_steps", "dat_steps", "probe_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NSPluginError(f"{name} must be a positive integer, got {v!r}")
        if self.world_size is not None and (not isinstance(self.world_size, int) or self.world_size < 1):
            raise NSPluginError(f"world_size must be a positive integer or null, got {self.world_size!r}")
        if self.train_limit is not None and (not isinstance(self.train_limit, int) or self.train_limit < 1):
            raise NSPluginError(f"train_limit must be a positive integer, got {self.train_limit!r}")
        if self.sched not in ("cosine", "constant"):
            raise NSPluginError(f"sched must be 'cosine' or 'constant', got {self.sched!r}")
        if self.search not in ("fast", "faithful"):
            raise NSPluginError(f"search must be 'fast' or 'faithful', got {self.search!r}")
        if self.vqgan not in VQGAN_CONFIGS:
            raise NSPluginError(f"vqgan must be one of {sorted(VQGAN_CONFIGS)}, got {self.vqgan!r}")
        return self

    @property
    def use_warm_start(self) -> bool:
        return (self.search == "fast") if self.warm_start is None else bool(self.warm_start)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NSPluginError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**d)


#: VQGAN settings for DAT. ``small`` is a randomly initialised model that runs on 32x32 images on a CPU
#: (``ch`` must be a multiple of 32 because the VQGAN uses GroupNorm(32)); ``openimages_f8_16384`` is the
#: pretrained model EasyRobust's DAT example downloads.
VQGAN_CONFIGS: Dict[str, Dict[str, Any]] = {
    "small": dict(ddconfig=dict(double_z=False, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                                ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
                  n_embed=64, embed_dim=4, url=None),
    "openimages_f8_16384": dict(
        ddconfig=dict(double_z=False, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0),
        n_embed=16384, embed_dim=4,
        url="http://alisec-competition.oss-cn-shanghai.aliyuncs.com/xiaofeng/easy_robust/pretrained_models/"
            "vqgan_openimages_f8_16384.ckpt"),
}


def _bool(s: str) -> bool:
    if isinstance(s, bool):
        return s
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _opt(conv):
    def f(s):
        if s is None or str(s).lower() in ("none", "null", ""):
            return None
        return conv(s)
    f.__name__ = getattr(conv, "__name__", "value")
    return f


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field (``steps_per_round`` -> ``--steps-per-round``)."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in t:
            conv = _bool
        elif "int" in t and "float" not in t:
            conv = int
        elif "float" in t:
            conv = float
        else:
            conv = str
        if "Optional" in t:
            conv = _opt(conv)
        kw = dict(default=default, dest=f.name, metavar=f.name.upper() if conv is not _bool else "BOOL",
                  type=conv, help=f"(default: {default})")
        if conv is _bool:
            kw["nargs"] = "?"
            kw["const"] = True
        p.add_argument(flag, **kw)


def read_yaml(path: str, *, ignore_unsupported: bool = False, extras: Optional[Dict[str, Any]] = None
              ) -> Dict[str, Any]:
    """The :class:`TrainConfig` keys of a YAML config file (dashes in keys normalised to underscores).
    EasyRobust training YAMLs are translated (:mod:`ns_plugin.training.easyrobust_yaml`); script-level values
    (``output``) go into ``extras`` when a dict is given."""
    from ..io import read_yaml_mapping
    from .easyrobust_yaml import translate

    d = read_yaml_mapping(path)
    d = {str(k).replace("-", "_"): v for k, v in d.items()}
    known = {f.name for f in fields(TrainConfig)}
    ours, more = translate(d, known, ignore_unsupported=ignore_unsupported, source=f"config file {path}")
    if extras is not None:
        extras.update(more)
    return ours


def build_parser(prog: str = "train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="ns_plugin fine-tuning (EasyRobust-style flags)")
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file setting defaults for the flags")
    add_config_arguments(p)
    return p


def parse_config(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None
                 ) -> TrainConfig:
    """EasyRobust's two-stage parse: ``--config FILE`` sets the defaults, flags override them."""
    parser = parser or build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_yaml(known.config))
    args = parser.parse_args(argv)
    return config_from_namespace(args)


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    return cfg.validate()


def load_config(path: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """A validated :class:`TrainConfig` from an optional YAML file plus keyword overrides."""
    d: Dict[str, Any] = read_yaml(path) if path else {}
    d.update(overrides)
    return TrainConfig.from_dict(d).validate()
