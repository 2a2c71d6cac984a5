"""Where a model's weights come from: timm pretrained weights and ``init:`` checkpoints.

"Approximate Nullspace Augmented Finetuning for Robust Vision Transformers" fine-tunes *pretrained*
ViT-S/16 and ViT-B/16 (timm) and EasyRobust's released DAT ViT-B/16 checkpoint. This module finds those
weights the way users have them, and says in one line, within seconds, when they are not there:

* **timm pretrained weights** (``pretrained: true``). timm 1.x downloads them through ``huggingface_hub``
  into the Hugging Face cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub`` = ``~/.cache/huggingface/hub``,
  layout ``models--timm--<name>.<tag>/snapshots/<rev>/model.safetensors``); older weights come from a URL
  into the torch hub cache (``$TORCH_HOME/hub/checkpoints``). :func:`pretrained_status` looks in both
  caches without any network access; a cached file is loaded from disk (no network at all), a missing one
  is downloaded by timm when the hub can be reached, and otherwise (offline, ``HF_HUB_OFFLINE=1``) the
  model fails at once naming the model and the cache it looked in.
* **init checkpoints** (``init: <path or URL>``): a file, or an ``http(s)://`` / ``file://`` URL downloaded
  once into the torch hub cache (``torch.hub.download_url_to_file``). Formats: EasyRobust's
  ``Sequential(NormalizeByChannelMeanStd, model)`` state dicts (``0.mean``, ``0.std``, ``1.*``), plain timm
  state dicts (the model's own normalisation is kept), training checkpoints with ``state_dict`` /
  ``state_dict_ema`` (``init_ema``) / ``model`` / ``model_ema`` entries (timm's and EasyRobust's
  ``CheckpointSaver`` output, whose ``args`` namespace loads without unpickling code), ``module.`` prefixes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import NSPluginError

log = logging.getLogger(__name__)

#: seconds to wait for a host before calling it unreachable (a missing resource must fail in seconds)
NETWORK_TIMEOUT = 5.0


# ----------------------------------------------------------------------------------------------------------
# caches (read from the environment at every call, as huggingface_hub and torch.hub define them)
# ----------------------------------------------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``), where timm and EasyRobust cache URLs."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: no Hugging Face network access."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def unreachable(url: str, timeout: float = NETWORK_TIMEOUT) -> Optional[str]:
    """``None`` when ``url``'s host answers (for http(s): a HEAD request below status 400), else the reason
    in a few words. ``file://`` URLs are checked on disk. Never waits longer than about ``timeout``."""
    p = urlparse(url)
    if p.scheme == "file":
        return None if Path(p.path).is_file() else f"no file {p.path}"
    if p.scheme not in ("http", "https"):
        return f"unsupported URL scheme {p.scheme!r} (use http, https or file)"
    host, port = p.hostname, p.port or (443 if p.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({_reason(e)})"
    import urllib.error
    import urllib.request
    try:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ns_plugin"})
        with urllib.request.urlopen(req, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return None if e.code in (403, 405) else f"HTTP {e.code} {e.reason}"  # some stores refuse HEAD only
    except (OSError, ValueError) as e:
        return f"{host} did not answer ({_reason(e)})"


def _reason(e: BaseException) -> str:
    r = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(r).splitlines()[0][:80]


def _download_status(what: str, src: str, plan: str, *, network: bool, unreachable_line: Callable[[str], str],
                     unchecked: Optional[str] = None) -> Status:
    """The tail shared by :func:`pretrained_status` and :func:`init_status` once nothing is cached: ``reachable``
    with ``plan`` (with ``unchecked`` or ``plan`` and "(network not checked)" unless ``network``), else
    ``missing`` with ``unreachable_line(why)``."""
    if not network:
        return Status(what, "reachable", f"{unchecked or plan} (network not checked)")
    why = unreachable(src)
    if why:
        return Status(what, "missing", unreachable_line(why))
    return Status(what, "reachable", plan)


# ----------------------------------------------------------------------------------------------------------
# timm pretrained weights
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Status:
    """Where a needed resource stands: ``present`` (on disk at ``path``), ``reachable`` (will be downloaded),
    ``missing`` (``detail`` says why and how to fix it) or ``skipped``."""
    what: str
    state: str
    detail: str = ""
    path: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return self.state in ("present", "reachable", "skipped")

    def line(self) -> str:
        return f"{self.what}: {self.detail}" if self.detail else f"{self.what}: {self.state}"


def timm_name_hint(name: str) -> Optional[str]:
    """None when timm knows ``name`` (pretrained tags such as ``.augreg_in1k`` and ``hf-hub:`` names allowed),
    else a suggestion (``"; did you mean 'x'?"`` or ``""``). The one lookup of model names in ns_plugin."""
    import difflib

    import timm
    if name.startswith("hf-hub:") or timm.is_model(name):
        return None
    base = name.split(".", 1)[0]
    known = timm.list_models()
    if base in known:
        return None
    close = difflib.get_close_matches(base, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_timm_name(name: str) -> None:
    """Raise one line when timm does not know ``name``."""
    hint = timm_name_hint(name)
    if hint is not None:
        raise NSPluginError(f"unknown model {name!r}: not a timm model name{hint or ' (see timm.list_models())'}")


def pretrained_status(name: str, *, network: bool = True) -> Status:
    """Where timm's pretrained weights for ``name`` are: cached on disk, downloadable, or missing.

    Looks in the Hugging Face cache (the file timm would fetch: ``model.safetensors`` or
    ``pytorch_model.bin`` of the model's ``hf_hub_id``) and in the torch hub cache (the model's ``url``),
    without network access. When neither holds them: ``missing`` if offline (``HF_HUB_OFFLINE``) or the
    host cannot be reached within :data:`NETWORK_TIMEOUT` seconds (``network=False`` skips the probe and
    reports ``reachable`` as "not checked"), else ``reachable``."""
    what = f"pretrained weights of timm model {name!r}"
    check_timm_name(name)
    from timm.models import get_pretrained_cfg
    from timm.models._hub import has_hf_hub

    if name.startswith("hf-hub:"):
        repo, hf_file, url, file = name[len("hf-hub:"):], None, None, None
    else:
        cfg = get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            return Status(what, "missing", f"timm has no pretrained weights for {name!r}; drop pretrained or give init:")
        repo, hf_file, url, file = cfg.hf_hub_id, cfg.hf_hub_filename, cfg.url, cfg.file
    if file:
        p = Path(file).expanduser()
        return Status(what, "present", str(p), p) if p.is_file() else Status(what, "missing", f"no file {p}")
    hf_cache = hf_cache_dir()
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for fn in ([hf_file] if hf_file else ["model.safetensors", "pytorch_model.bin"]):
                hit = try_to_load_from_cache(repo, fn, cache_dir=str(hf_cache))
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Status(what, "present", hit, Path(hit))
    if url:
        p = torch_hub_checkpoints() / os.path.basename(urlparse(url).path)
        if p.is_file():
            return Status(what, "present", str(p), p)
    where = f"the Hugging Face cache {hf_cache}" + (f" or the torch hub cache {torch_hub_checkpoints()}" if url else "")
    if repo and not has_hf_hub() and not url:
        return Status(what, "missing", f"not in {where}, and timm cannot use the installed huggingface_hub "
                                       f"(timm 1.0.x needs huggingface_hub<2: run `make venv`)")
    src = f"{hf_endpoint()}/{repo}" if repo and has_hf_hub() else url
    if repo and hf_offline() and (has_hf_hub() or not url):
        return Status(what, "missing", f"not in {where} and HF_HUB_OFFLINE is set; run once with network or copy "
                                       f"the snapshot of {repo} into that cache")
    return _download_status(what, src, f"not cached; will download {src}", network=network,
                            unchecked=f"not cached; would download {src}",
                            unreachable_line=lambda why: f"not in {where}, and {why}; run once with network or "
                                                         f"copy the weights there")


def create_timm(name: str, *, pretrained: bool = False, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` that reads cached pretrained weights from disk without touching the network and
    fails in one line (naming the model and the caches) when they are neither cached nor downloadable.

    ``num_classes`` different from the weights' replaces the classifier (timm's convention)."""
    import timm

    check_timm_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained:
        st = pretrained_status(name)
        if not st.ok:
            raise NSPluginError(st.line())
        if st.path is not None:  # cached: load that file, no network access
            kwargs["pretrained_cfg_overlay"] = dict(file=str(st.path), custom_load=str(st.path).endswith(".npz"))
        else:
            log.info("downloading the %s", st.what)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except NSPluginError:
        raise
    except Exception as e:  # noqa: BLE001 (download and format failures come in many types)
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise NSPluginError(f"cannot create timm model {name!r}{' with pretrained weights' if pretrained else ''} "
                            f"({type(e).__name__}: {msg})") from None


# ----------------------------------------------------------------------------------------------------------
# init checkpoints (files and URLs)
# ----------------------------------------------------------------------------------------------------------
def is_url(source: str) -> bool:
    return urlparse(str(source)).scheme in ("http", "https", "file")


def url_cache_path(url: str) -> Path:
    """Where :func:`fetch` keeps a downloaded ``url``: the torch hub checkpoint folder, the file name prefixed
    with a hash of the URL (EasyRobust's model zoo names many different files ``model_best.pth.tar``)."""
    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    return torch_hub_checkpoints() / f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{name}"


def init_status(source: str, *, network: bool = True) -> Status:
    """``present`` (file, or URL already downloaded), ``reachable`` (URL to download) or ``missing``."""
    what = f"checkpoint {source}"
    if not is_url(source):
        p = Path(source).expanduser()
        if p.is_file():
            return Status(what, "present", str(p), p)
        return Status(what, "missing", "is a folder, not a checkpoint file" if p.is_dir() else "does not exist")
    cached = url_cache_path(source)
    if cached.is_file():
        return Status(what, "present", f"cached at {cached}", cached)
    return _download_status(what, source, f"will download to {cached}", network=network,
                            unreachable_line=lambda why: f"cannot be downloaded ({why}) and is not in the torch hub "
                                                         f"cache {cached.parent}")


def fetch(source: str, *, progress: bool = True) -> Path:
    """A local file for ``source``: the path itself, or a URL downloaded once into the torch hub cache."""
    st = init_status(source, network=False)
    if st.state == "missing":
        raise NSPluginError(st.line())
    if st.path is not None:
        return st.path
    why = unreachable(source)
    if why:
        raise NSPluginError(f"checkpoint {source} cannot be downloaded ({why}) and is not in the torch hub "
                            f"cache {url_cache_path(source).parent}")
    dst = url_cache_path(source)
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", source, dst)
    t0 = time.time()
    try:
        torch.hub.download_url_to_file(source, str(dst), progress=progress)  # temp file + move: atomic
    except Exception as e:  # noqa: BLE001
        raise NSPluginError(f"downloading checkpoint {source} failed ({type(e).__name__}: {_reason(e)})") from None
    log.info("downloaded %s (%.0f MB, %.0f s)", dst.name, dst.stat().st_size / 2 ** 20, time.time() - t0)
    return dst


def read_init(source: str, *, use_ema: bool = False, trust: bool = False,
              progress: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state_dict, checkpoint dict)`` of a checkpoint file or URL in any of the formats of the module
    docstring (``module.`` prefixes stripped). ``use_ema`` takes ``state_dict_ema`` (or ``model_ema``) and
    fails in one line when there is none. :func:`ns_plugin.models.create_model` loads it into a model."""
    from .checkpoint import read_checkpoint, strip_prefix

    path = fetch(source, progress=progress)
    ckpt = read_checkpoint(path, trust=trust)
    if use_ema:
        sd = next((ckpt[k] for k in ("state_dict_ema", "model_ema") if isinstance(ckpt.get(k), dict)), None)
        if sd is None:
            raise NSPluginError(f"checkpoint {source} has no EMA weights (state_dict_ema / model_ema); "
                                f"drop init_ema / use_ema")
        sd = strip_prefix(sd)
    else:
        sd = ckpt["state_dict"]
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise NSPluginError(f"checkpoint {source} holds no tensors")
    return sd, ckpt
