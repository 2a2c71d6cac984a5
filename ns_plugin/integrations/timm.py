"""timm integration: the embedded architecture as the timm model ``ns_vit_digits`` and fine-tuned checkpoints as
timm models (:func:`register_checkpoint`), so that ``timm.create_model(name, pretrained=True)`` loads their
weights (EasyRobust's ``benchmarks/benchmark.py --model name`` builds them) and robustbench's
``load_model(name, dataset=..., threat_model=..., custom_checkpoint=...)`` finds ``{name}_{dataset}_{threat}``.

The entrypoints live in :mod:`ns_plugin.integrations.timm_models` (timm files each entrypoint under the module
that defines it and reads that module's ``default_cfgs``). Importing this module registers nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ..errors import NSPluginError
from ..models import DIGITS_MODEL, bare_state_dict, build_net
from . import _LOCK, timm_models
from .robustbench import ROBUSTBENCH_THREATS, robustbench_name

#: timm model name -> signature of what ns_plugin registered under it (for idempotence and clash checks)
_TIMM_REGISTERED: Dict[str, tuple] = {}


def _timm_cfg(*, num_classes: int, input_size, mean, std, file: str = "", arch: str = "",
              description: str = "") -> Dict[str, object]:
    return dict(url="", file=file, num_classes=int(num_classes), input_size=tuple(int(v) for v in input_size),
                pool_size=None, crop_pct=1.0, interpolation="bicubic", fixed_input_size=True,
                mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                first_conv="patch_embed.proj", classifier="head", license="", description=description,
                origin_url="", notes=(f"ns_plugin checkpoint, architecture {arch}",) if arch else ())


def _read_weights(path: str, use_ema: bool):
    from ..checkpoint import read_checkpoint
    ckpt = read_checkpoint(path)
    key = "state_dict_ema" if use_ema else "state_dict"
    if not isinstance(ckpt.get(key), dict):
        raise NSPluginError(f"checkpoint {path} has no {key!r} entry" + ("; register it with use_ema=False" if use_ema else ""))
    return ckpt, ckpt[key]


def _arch_builder(arch):
    """``arch`` -> ``fn(**kwargs) -> bare nn.Module`` (:func:`ns_plugin.models.build_net`): ``"ns_vit_digits"``,
    a timm model name, or a dict of timm ``VisionTransformer`` arguments."""
    if not isinstance(arch, dict) and arch != DIGITS_MODEL:
        import timm
        if not isinstance(arch, str) or not timm.is_model(arch):
            raise NSPluginError(f"unknown architecture {arch!r}: pass arch= a timm model name or a dict of "
                                f"VisionTransformer arguments")

    def build(**kw):
        return build_net(arch, pretrained=False, **kw)
    return build


def _load_weights_into(model, sd, num_classes_ckpt: int, source: str):
    """Load a bare state dict into ``model``; when the model was built with another number of classes the
    classifier is left as initialised (timm's convention for ``pretrained=True, num_classes=k``)."""
    from ..checkpoint import load_into
    head = [k for k in ("head.weight", "head.bias") if k in sd]
    own = model.state_dict()
    if head and tuple(own.get("head.weight", sd["head.weight"]).shape) != tuple(sd["head.weight"].shape):
        sd = {k: v for k, v in sd.items() if k not in head}
        missing = [k for k in own if k not in sd and k not in head]
        if missing:
            raise NSPluginError(f"{source} does not fit this model ({len(missing)} missing key(s), e.g. {missing[0]})")
        model.load_state_dict({**{k: own[k] for k in head}, **sd})
        return model
    return load_into(model, sd, source=source)


def _make_entrypoint(name: str, build, cfg: Dict[str, object], *, use_ema: bool, robustbench: bool,
                     dataset: Optional[str] = None):
    """A timm entrypoint ``name(pretrained=False, **kwargs)``.

    ``pretrained=True`` loads the weights named by the pretrained config's ``file`` (overridable with
    ``pretrained_cfg_overlay=dict(file=...)``) with ``torch.load(weights_only=True)``. ``robustbench`` entrypoints
    return ``Sequential(Normalize(mean, std), model)`` (images in [0, 1]; state-dict keys ``0.*``/``1.*`` as in
    our checkpoints, so ``custom_checkpoint=`` loads into it), padded to ``num_classes`` logits if more are asked:
    for robustbench's ImageNet a k-class model's logits go to the labels of
    :func:`~ns_plugin.integrations.robustbench.imagenet_class_index` (where our folder writer files class k),
    otherwise to labels 0..k-1.
    """
    def entry(pretrained: bool = False, **kwargs):
        import dataclasses
        from timm.models._builder import resolve_pretrained_cfg

        pretrained_cfg = kwargs.pop("pretrained_cfg", None)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        kwargs.pop("cache_dir", None)
        resolved = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
        k_ckpt = int(cfg["num_classes"])
        want = kwargs.pop("num_classes", None)
        want = k_ckpt if want is None else int(want)
        build_classes = k_ckpt if robustbench else want
        if robustbench and want < k_ckpt:
            raise NSPluginError(f"{name} has {k_ckpt} classes; cannot serve a {want}-class benchmark")
        model = build(num_classes=build_classes, **kwargs)
        if pretrained:
            file = resolved.file or cfg.get("file")
            if not file:
                raise NSPluginError(f"timm model {name} has no weights file; pass pretrained_cfg_overlay=dict(file=...)")
            if name == DIGITS_MODEL and file == cfg.get("file"):
                from ..checkpoint import state_dict_of
                from ..embedded import load_packaged_default
                sd = state_dict_of(load_packaged_default()[0])   # shipped weights, SHA-256 checked; never trains
            else:
                _, sd = _read_weights(file, use_ema)
            _load_weights_into(model, bare_state_dict(sd), k_ckpt, source=f"weights {file}")
        cfg_dict = {k: v for k, v in dataclasses.asdict(resolved).items() if k != "state_dict"}
        model.pretrained_cfg = model.default_cfg = cfg_dict
        if not robustbench:
            return model
        from torch import nn
        from ..models import Normalize
        out = nn.Sequential(Normalize(resolved.mean, resolved.std), model)
        if want > k_ckpt:
            index = None
            if dataset == "imagenet" and want == 1000:
                from .robustbench import imagenet_class_index
                index = imagenet_class_index(k_ckpt)
            out.append(timm_models.PadClasses(want, index=index))
        out.pretrained_cfg = out.default_cfg = cfg_dict
        return out.eval() if pretrained else out

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = timm_models.__name__
    entry.__doc__ = f"ns_plugin model {name} ({'robustbench form: images in [0, 1]' if robustbench else 'bare timm model'})."
    return entry


def _register_timm(name: str, entry, cfg: Dict[str, object], signature: tuple) -> bool:
    """File ``entry`` under ``name`` in timm's registry. Returns False (no-op) when the same thing is already
    registered; a different ns_plugin model or any timm model under that name is an error."""
    import timm
    from timm.models import register_model

    with _LOCK:
        if name in _TIMM_REGISTERED:
            if _TIMM_REGISTERED[name] == signature:
                return False
            raise NSPluginError(f"timm model {name!r} is already registered by ns_plugin for {_TIMM_REGISTERED[name][0]}; "
                                f"choose another name")
        if timm.is_model(name):
            raise NSPluginError(f"timm already has a model named {name!r}; register the checkpoint under another name")
        timm_models.default_cfgs[name] = cfg
        setattr(timm_models, name, entry)
        register_model(entry)
        _TIMM_REGISTERED[name] = signature
        return True


def _digits_weights_path() -> str:
    """The ``ns_vit_digits`` weights: the embedded default shipped in the package (a registry call never
    trains; the file's SHA-256 is checked when it is loaded)."""
    from ..embedded import packaged_weights_path
    return str(packaged_weights_path())


def register_timm_digits() -> str:
    """Register the embedded architecture as the timm model ``ns_vit_digits`` (a bare ``VisionTransformer``
    with the default config; ``pretrained=True`` loads the packaged embedded default, SHA-256 checked: it never
    trains).
    Its ``pretrained_cfg`` carries the digits mean/std and input size. Idempotent."""
    from ..models import DEFAULT_VIT, DIGITS_MEAN, DIGITS_STD
    path = _digits_weights_path()
    cfg = _timm_cfg(num_classes=DEFAULT_VIT["num_classes"], input_size=(3, DEFAULT_VIT["img_size"], DEFAULT_VIT["img_size"]),
                    mean=DIGITS_MEAN, std=DIGITS_STD, file=path, arch=DIGITS_MODEL,
                    description="ns_plugin embedded tiny ViT (32x32, patch 8, 4 blocks, width 64) on sklearn digits")
    entry = _make_entrypoint(DIGITS_MODEL, _arch_builder(DIGITS_MODEL), cfg, use_ema=False, robustbench=False)
    # the weights file follows $NS_PLUGIN_CACHE at load time, so the signature does not include it
    _register_timm(DIGITS_MODEL, entry, cfg, ("<ns_plugin cache>", DIGITS_MODEL, False, "bare"))
    return DIGITS_MODEL


def checkpoint_arch(meta: Dict[str, object], path: str = "checkpoint"):
    """The architecture of a checkpoint we wrote, from its ``meta``: the harness stores the timm name (or
    ``"ns_vit_digits"``) in ``meta["arch"]``; ``ns-plugin train`` stores a hash of the architecture there and
    the model name in ``meta["model"]`` (``"default"`` = the embedded tiny ViT)."""
    import timm
    for key in ("arch", "model"):
        v = meta.get(key)
        if v == "default":
            v = DIGITS_MODEL
        if isinstance(v, dict) or v == DIGITS_MODEL or (isinstance(v, str) and timm.is_model(v)):
            return v
    raise NSPluginError(f"{path} does not name a known architecture (meta arch={meta.get('arch')!r}, "
                        f"model={meta.get('model')!r}); pass arch= a timm model name or a dict of "
                        f"VisionTransformer arguments")


def register_checkpoint(name: str, path, *, arch=None, use_ema: bool = False, robustbench=("imagenet",),
                        threat_models=ROBUSTBENCH_THREATS) -> List[str]:
    """Register an ns_plugin checkpoint as timm model(s); returns the timm names registered.

    Args:
        name: timm name for the bare model (e.g. ``"vit_digits_ns"``): ``timm.create_model(name, pretrained=True)``
            loads the weights; ``pretrained=False, num_classes=k`` gives the architecture, as EasyRobust's
            ``benchmarks/benchmark.py --model name --ckpt_path path`` builds it. ``pretrained_cfg`` carries the
            checkpoint's mean/std (from ``0.mean``/``0.std``) and input size.
        path: checkpoint (``{"state_dict": {"0.mean", "0.std", "1.*"}, "meta": {...}}``, see
            :mod:`ns_plugin.checkpoint`); read with ``weights_only=True``, checked against the architecture now.
        arch: timm architecture name, ``"ns_vit_digits"``, or a dict of ``VisionTransformer`` arguments;
            default ``meta["arch"]`` of the checkpoint.
        use_ema: load ``state_dict_ema`` instead of ``state_dict``.
        robustbench: datasets (robustbench names, e.g. ``"imagenet"``, ``"cifar10"``) for which the robustbench
            form ``{name}_{dataset}_{threat}`` is also registered, for each of ``threat_models``; ``()`` for none.

    Registering the same checkpoint again is a no-op; a name timm already has (or that ns_plugin registered
    for another file) is an :class:`NSPluginError`, as is a checkpoint that does not fit ``arch``.
    """
    from pathlib import Path
    import timm  # noqa: F401 - fail early if timm is missing

    if not isinstance(name, str) or not name or any(c in name for c in "./ "):
        raise NSPluginError(f"model name must be a non-empty identifier without '.', '/' or spaces, got {name!r}")
    path = str(Path(path).expanduser().resolve())
    if isinstance(robustbench, str):
        robustbench = (robustbench,)
    if isinstance(threat_models, str):
        threat_models = (threat_models,)
    ckpt, sd = _read_weights(path, use_ema)
    arch = arch if arch is not None else checkpoint_arch(ckpt.get("meta") or {}, path)
    build = _arch_builder(arch)
    bare = bare_state_dict(sd)
    if "head.weight" not in bare:
        raise NSPluginError(f"checkpoint {path} has no classifier 'head.weight'; only timm ViT-style classifiers "
                            f"can be registered")
    k = int(bare["head.weight"].shape[0])
    model = build(num_classes=k)
    _load_weights_into(model, bare, k, source=f"checkpoint {path}")  # architecture check, now
    from ..models import input_size
    size = input_size(model) or (3, 224, 224)
    if "0.mean" in sd:
        mean, std = sd["0.mean"].reshape(-1).tolist(), sd["0.std"].reshape(-1).tolist()
    else:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    arch_key = arch if isinstance(arch, str) else repr(sorted(arch.items()))
    cfg = _timm_cfg(num_classes=k, input_size=size, mean=mean, std=std, file=path, arch=arch_key,
                    description=f"ns_plugin checkpoint {Path(path).name}")
    plan = [(name, None)] + [(robustbench_name(name, d, t), d) for d in robustbench for t in threat_models]
    import timm as _timm
    with _LOCK:
        for n, _ in plan:  # check every name before registering any
            sig = _TIMM_REGISTERED.get(n)
            if sig is not None and sig[:3] != (path, arch_key, use_ema):
                raise NSPluginError(f"timm model {n!r} is already registered by ns_plugin for {sig[0]}; choose another name")
            if sig is None and _timm.is_model(n):
                raise NSPluginError(f"timm already has a model named {n!r}; register the checkpoint under another name")
        for n, d in plan:
            entry = _make_entrypoint(n, build, cfg, use_ema=use_ema, robustbench=d is not None, dataset=d)
            _register_timm(n, entry, dict(cfg), (path, arch_key, use_ema, "robustbench" if d else "bare"))
        # robustbench's load_model(name, dataset=other) would end in a bare KeyError in its model zoo: answer
        # it with one line instead (names nobody else has taken only)
        from ..evaluation.leaderboard import ROBUSTBENCH_DATASETS
        for d in ROBUSTBENCH_DATASETS:
            if d in robustbench:
                continue
            for t in threat_models:
                n = robustbench_name(name, d, t)
                if n in _TIMM_REGISTERED or _timm.is_model(n):
                    continue
                _register_timm(n, _wrong_dataset_entry(n, name, d, tuple(robustbench)), dict(cfg),
                               (path, arch_key, use_ema, "not-served"))
    return [n for n, _ in plan]


def _wrong_dataset_entry(timm_name: str, name: str, dataset: str, served):
    """A timm entrypoint that explains, in one line, that checkpoint ``name`` is not served for ``dataset``."""
    def entry(pretrained: bool = False, **kwargs):
        raise NSPluginError(
            f"ns_plugin checkpoint {name!r} is registered for robustbench dataset(s) {', '.join(served) or 'none'}, "
            f"not {dataset}; if it was trained for {dataset}, register it with register_checkpoint(..., "
            f"robustbench=({dataset!r},)) or `ns-plugin run --checkpoint {name}=PATH --robustbench {dataset}`")
    entry.__name__ = entry.__qualname__ = timm_name
    entry.__module__ = timm_models.__name__
    entry.__doc__ = f"ns_plugin: {name} is not registered for robustbench dataset {dataset} (raises a clear error)."
    return entry


def registered_timm_models() -> List[str]:
    """timm names registered by ns_plugin in this process."""
    return sorted(_TIMM_REGISTERED)
