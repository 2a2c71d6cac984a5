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
    amp_dtype: str = "float16"         #: "float16" (with a GradScaler) or "bfloat16" (no scaler; also used for
                                       #: the training attacks of madry/trades/dat, which stay fp32 under fp16)
    tf32: bool = True                  #: TF32 matmuls/convolutions + cudnn.benchmark on CUDA (search: full fp32)
    seed: int = 0
    world_size: Optional[int] = None   #: expected DDP world size (None = whatever torchrun gives)
    # --- nullspace noise search (arXiv:2403.10476 Eq. 6-8, Alg. 1 lines 3-14)
    eps: float = 0.03                  #: ε threshold on the "MSE probability"
    lim: float = 3.0                   #: initial noise ~ U(-lim, lim)
    noise_lr: float = 0.1
    noise_max_steps: int = 3000        #: T, the cap on noise steps per round
    search: str = "fast"               #: "fast" or "faithful" (see ns_plugin.nullspace.search)
    search_batch_size: int = 128       #: minibatch size of the noise search (B = 128, a fresh batch per step)
    warm_start: bool = False           #: start each round's search from the previous noise (expanded, then
                                       #: descended) instead of Alg. 1 line 3's fresh U(-lim, lim) every round.
                                       #: Opt-in: warm starts grow the noise norm by themselves (49.9 -> 66.4
                                       #: over 7 re-searches on a fixed model), so they cannot show Fig. 4
    stop_confirm_batches: int = 0      #: 0 = the paper's stop rule (δ < ε on the current search batch); k > 0
                                       #: also requires δ < ε on k x search_batch_size fixed training images
    heldout_size: int = 512            #: held-out images (digits: the val split; folders: val/) on which every
                                       #: round logs the noise's MSE probability (heldout_mse_prob); 0 = off
    # --- random-noise ablations (arXiv:2403.10476 Table 4)
    random_shrink: float = 0.8         #: "random": N(0, 1) token noise multiplied by this until δ < ε
    random_norm: Optional[float] = None  #: "random_norm": fixed norm of the Gaussian noise; None = this
                                         #: round's learnt norm
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
    init: Optional[str] = None         #: checkpoint to start from: a file or URL (downloaded once to the torch
                                       #: hub cache); EasyRobust Sequential or plain timm state dicts
    init_ema: bool = False             #: start from the checkpoint's EMA weights (state_dict_ema)
    num_classes: Optional[int] = None
    data: str = "digits"               #: "digits" (embedded) or an ImageFolder root with class subfolders
    image_size: Optional[int] = None   #: resize the images, folder or digits (default: the model's input size)
    train_limit: Optional[int] = None  #: use only the first N training images (quick runs)
    augment: bool = False              #: folder data: RandomResizedCrop + flip (timm / EasyRobust's usual)
    workers: Optional[int] = None      #: folder data: DataLoader workers (None: $NS_PLUGIN_WORKERS or min(8, CPUs-1))
    # --- logging
    probe: bool = False                #: per-round held-out probe (clean and FGSM-1/255 accuracy)
    probe_size: int = 256
    plot: bool = True                  #: write the Fig.-4-style plot at the end
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Check every field against :data:`TRAIN_SPEC` (types, ranges, paths; one line naming the fix) and
        store the normalised values (``"1e-5"`` -> 1e-05, ``2.0`` -> 2). Cheap: no model or data is loaded."""
        from .._registry import trainers  # filled by ns_plugin.training (imported before this module)
        from ..validation import validate

        d = dataclasses.asdict(self)
        missing = [k for k in d if k not in TRAIN_SPEC]
        assert not missing, f"TrainConfig fields without a TRAIN_SPEC check: {missing}"
        for k, v in validate(d, TRAIN_SPEC, "config").items():
            setattr(self, k, v)
        trainers.get(self.method)
        check_model_name(self.model)
        if self.warm_start is None:      # older configs wrote null for "the default"
            self.warm_start = False
        return self

    @property
    def use_warm_start(self) -> bool:
        return bool(self.warm_start)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NSPluginError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**d)


#: Where each :class:`TrainConfig` default comes from (printed next to every setting a comparison records in
#: ``config.json``, so a paper-scale run shows which values it did not set itself).
_APPC = "NS-ViT paper App. C (Approximate Nullspace Augmented Finetuning for Robust Vision Transformers)"
DEFAULT_SOURCES: Dict[str, str] = {
    **{k: _APPC for k in ("rounds", "steps_per_round", "batch_size", "lr", "sched", "eps", "lim", "noise_lr",
                          "noise_max_steps", "search_batch_size")},
    "weight_decay": "NS-ViT reference code (AdamW weight decay 0.05)",
    "model_ema_decay": "NS-ViT reference code (EMA 0.9998)",
    "model_ema": "ns_plugin default (off; the paper uses EMA only for DAT + NS)",
    "warm_start": "ns_plugin default (null: on for search fast, off for faithful; Alg. 1 line 3 starts fresh)",
    "search": "ns_plugin default (fast: same noise as the reference loop for the same init)",
    **{k: "NS-ViT reference code (PGD 8/255, step 2/255, 10 steps)" for k in ("pgd_eps", "pgd_alpha", "pgd_steps")},
    "madry_clean_weight": "classic Madry (CE on adversarial examples only; the reference code used 1)",
    "trades_beta": "TRADES paper (beta 6; the NS-ViT reference code used 1)",
    **{k: "EasyRobust DAT example (examples/imageclassification/imagenet/dat)"
       for k in ("dat_eps", "dat_steps", "dat_lr", "dat_random_start_prob")},
    "vqgan": "ns_plugin default (small random VQGAN, a stand-in for tests)",
}


def _train_spec():
    from ..validation import Bool, Choice, Float, Int, PathCheck, Str
    pos = Int(1)
    return {
        "method": Str(), "rounds": pos, "steps_per_round": pos, "batch_size": pos,
        "lr": Float(0, 1, lo_open=True), "weight_decay": Float(0, 10),
        "sched": Choice("cosine", "constant"), "clip_grad": Float(0, 1e9, lo_open=True, optional=True),
        "model_ema": Bool(), "model_ema_decay": Float(0, 1, lo_open=True, hi_open=True), "amp": Bool(),
        "amp_dtype": Choice("float16", "bfloat16"), "tf32": Bool(),
        "seed": Int(0), "world_size": Int(1, optional=True),
        # the MSE probability of two softmax vectors is at most 2
        "eps": Float(0, 2, lo_open=True), "lim": Float(0, 1e4, lo_open=True),
        "noise_lr": Float(0, 100, lo_open=True), "noise_max_steps": pos, "search": Choice("fast", "faithful"),
        "search_batch_size": pos, "warm_start": Bool(optional=True),
        "stop_confirm_batches": Int(0), "heldout_size": Int(0),
        "random_shrink": Float(0, 1, lo_open=True, hi_open=True),
        "random_norm": Float(0, 1e9, lo_open=True, optional=True),
        "pgd_eps": Float(0, 1, lo_open=True), "pgd_alpha": Float(0, 1, lo_open=True), "pgd_steps": pos,
        "madry_clean_weight": Float(0, 1e4), "trades_beta": Float(0, 1e4),
        "vqgan": Choice(*VQGAN_CONFIGS), "vqgan_seed": Int(0),
        "dat_eps": Float(0, 1e3, lo_open=True), "dat_steps": pos, "dat_lr": Float(0, 1e3, lo_open=True),
        "dat_random_start_prob": Float(0, 1),
        "model": Str(), "pretrained": Bool(), "init": Str(optional=True), "init_ema": Bool(),
        "num_classes": Int(1, 100_000, optional=True),
        "data": PathCheck("dir", special=("digits",)), "image_size": Int(1, 8192, optional=True),
        "train_limit": Int(1, optional=True), "augment": Bool(), "workers": Int(0, optional=True),
        "probe": Bool(), "probe_size": pos, "plot": Bool(), "progress": Bool(),
    }


def check_model_name(name: str, where: str = "model") -> str:
    """``"default"`` or a model name timm knows (``name.tag`` pretrained tags allowed), else one line."""
    if name == "default":
        return name
    from ..weights import timm_name_hint
    hint = timm_name_hint(name)
    if hint is not None:
        raise NSPluginError(f"{where} {name!r} is neither 'default' nor a timm model name{hint}")
    return name


#: VQGAN settings for DAT. ``small`` is a randomly initialised model that runs on 32x32 images on a CPU
#: (``ch`` must be a multiple of 32 because the VQGAN uses GroupNorm(32)); it downsamples once, so at 224 its
#: mid-block attention would see 112x112 = 12,544 tokens. ``small_f8`` is the random stand-in at 224: the
#: pretrained model's factor 8 (28x28 = 784 tokens in the attention), 32-64 channels (~1 M parameters).
#: ``openimages_f8_16384`` is the pretrained model EasyRobust's DAT example downloads.
VQGAN_CONFIGS: Dict[str, Dict[str, Any]] = {
    "small": dict(ddconfig=dict(double_z=False, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                                ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
                  n_embed=64, embed_dim=4, url=None),
    "small_f8": dict(ddconfig=dict(double_z=False, z_channels=4, resolution=224, in_channels=3, out_ch=3, ch=32,
                                   ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
                     n_embed=64, embed_dim=4, url=None),
    "openimages_f8_16384": dict(
        ddconfig=dict(double_z=False, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0),
        n_embed=16384, embed_dim=4,
        url="http://alisec-competition.oss-cn-shanghai.aliyuncs.com/xiaofeng/easy_robust/pretrained_models/"
            "vqgan_openimages_f8_16384.ckpt"),
}


#: The check of every :class:`TrainConfig` field (:mod:`ns_plugin.validation`): used by ``validate()``, the
#: YAML reader and the ``--flags``. A new config field adds its check here (a test checks none is missing).
TRAIN_SPEC: Dict[str, Any] = _train_spec()


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field (``steps_per_round`` -> ``--steps-per-round``)."""
    from ..validation import Bool, argtype
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        check = TRAIN_SPEC[f.name]
        is_bool = isinstance(check, Bool)
        kw = dict(default=default, dest=f.name, metavar=f.name.upper() if not is_bool else "BOOL",
                  type=argtype(check, flag), help=f"(default: {default})")
        if is_bool:
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
