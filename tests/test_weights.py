"""Weights in, the way users have them: timm's hub support, pretrained weights from the Hugging Face cache
offline, and ``init:`` checkpoints in EasyRobust / timm / torch formats (files and URLs). Every test runs
with temporary HF / torch hub caches: the user's ~/.cache is never read or written."""
import argparse
import os
import time

import pytest
import torch

from ns_plugin.errors import NSPluginError

TINY = "test_vit"                     # timm's own tiny test ViT (0.37 M parameters, 160x160), real hub weights
TINY_REPO = "timm/test_vit.r160_in1k"  # where timm 1.0.9 fetches TINY's pretrained weights


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty HF and torch hub caches in tmp_path, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path


def put_in_hf_cache(cache_root, repo, state_dict, rev="a" * 40):
    """Write ``state_dict`` as huggingface_hub lays out a download: blobs/<hash>, snapshots/<rev>/model.safetensors
    (a symlink to the blob) and refs/main."""
    from safetensors.torch import save_file
    d = cache_root / ("models--" + repo.replace("/", "--"))
    (d / "blobs").mkdir(parents=True)
    (d / "snapshots" / rev).mkdir(parents=True)
    (d / "refs").mkdir()
    blob = d / "blobs" / ("b" * 64)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(blob))
    os.symlink(os.path.relpath(blob, d / "snapshots" / rev), d / "snapshots" / rev / "model.safetensors")
    (d / "refs" / "main").write_text(rev)
    return d


def test_timm_hub_support_is_live():
    """timm 1.0.9 imports huggingface_hub's API (2.x removed repo_type_and_id_from_hf_id: no hub support)."""
    import huggingface_hub
    from timm.models._hub import has_hf_hub
    assert has_hf_hub(necessary=True)
    assert int(huggingface_hub.__version__.split(".")[0]) < 2, huggingface_hub.__version__


def test_pretrained_weights_load_offline_from_the_hf_cache(caches):
    import timm
    from ns_plugin.training import load_config
    from ns_plugin.training.loop import build_model
    from ns_plugin.weights import create_timm, pretrained_status
    torch.manual_seed(1)
    ref = timm.create_model(TINY, pretrained=False).state_dict()
    assert pretrained_status(TINY).state == "missing"
    put_in_hf_cache(caches / "hf" / "hub", TINY_REPO, ref)
    st = pretrained_status(TINY)
    assert st.state == "present" and str(st.path).startswith(str(caches)), st
    net = create_timm(TINY, pretrained=True)
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    # the training door: Sequential(Normalize with timm's mean/std, net) with the cached weights
    model = build_model(load_config(model=TINY, pretrained=True, progress=False))
    assert torch.equal(model[1].head.weight, ref["head.weight"]) and model[0].mean.tolist() == [0.5, 0.5, 0.5]


def test_pretrained_missing_offline_fails_in_one_line_within_seconds(caches):
    from ns_plugin.weights import create_timm
    t0 = time.time()
    with pytest.raises(NSPluginError) as e:
        create_timm("vit_small_patch16_224", pretrained=True)
    msg = str(e.value)
    assert time.time() - t0 < 5
    assert "\n" not in msg and "'vit_small_patch16_224'" in msg and str(caches / "hf" / "hub") in msg, msg
    assert "HF_HUB_OFFLINE" in msg


def test_pretrained_unreachable_hub_fails_fast_without_offline_flag(caches, monkeypatch):
    """Not offline, but the hub does not answer (a closed local port stands in for no network)."""
    from ns_plugin.weights import create_timm
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.time()
    with pytest.raises(NSPluginError, match=r"vit_small_patch16_224.*cannot be reached") as e:
        create_timm("vit_small_patch16_224", pretrained=True)
    assert time.time() - t0 < 10 and "\n" not in str(e.value)


def test_unknown_timm_name_is_one_line():
    from ns_plugin.weights import create_timm
    with pytest.raises(NSPluginError, match=r"unknown model 'vit_smal_patch16_224': not a timm model name; "
                                             r"did you mean 'vit_small_patch16_224'"):
        create_timm("vit_smal_patch16_224")


# ---- init checkpoints ---------------------------------------------------------------------------------
def _two_models():
    from ns_plugin.models import build_default_model
    a, b = build_default_model(seed=1), build_default_model(seed=2)
    a[0].mean.fill_(0.25)   # a normaliser unlike the default's: must come from the checkpoint
    return a, b


def _equal(m, sd):
    return all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def _cfg(**kw):
    from ns_plugin.training import load_config
    return load_config(model="default", progress=False, **kw)


def test_init_easyrobust_checkpointsaver_format_and_ema(caches):
    """EasyRobust's DAT release: timm's CheckpointSaver dict with Sequential keys, DDP prefixes, an args
    Namespace, optimizer state and state_dict_ema."""
    from ns_plugin.training.loop import build_model
    a, b = _two_models()
    path = caches / "model_best.pth.tar"
    torch.save({"epoch": 299, "arch": "vit_base_patch16_224", "version": 2, "metric": 81.38,
                "state_dict": {f"module.{k}": v for k, v in a.state_dict().items()},
                "state_dict_ema": b.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "args": argparse.Namespace(model="vit_base_patch16_224", mean=[0.0] * 3, model_ema=True)}, path)
    assert _equal(build_model(_cfg(init=str(path))), a.state_dict())
    assert _equal(build_model(_cfg(init=str(path), init_ema=True)), b.state_dict())


def test_init_plain_timm_state_dict_keeps_the_model_normaliser(caches):
    from ns_plugin.training.loop import build_model
    a, _ = _two_models()
    path = caches / "timm.pth"
    torch.save({f"module.{k}": v for k, v in a[1].state_dict().items()}, path)
    m = build_model(_cfg(init=str(path)))
    assert _equal(m[1], a[1].state_dict()) and not torch.equal(m[0].mean, a[0].mean)
    with pytest.raises(NSPluginError, match=r"has no EMA weights.*drop init_ema"):
        build_model(_cfg(init=str(path), init_ema=True))


def test_init_url_downloads_once_to_the_torch_hub_cache(caches):
    from ns_plugin.training.loop import build_model
    from ns_plugin.weights import url_cache_path
    a, _ = _two_models()
    src = caches / "release" / "model_best.pth.tar"
    src.parent.mkdir()
    torch.save({"state_dict": a.state_dict()}, src)
    url = src.as_uri()
    assert _equal(build_model(_cfg(init=url)), a.state_dict())
    cached = url_cache_path(url)
    assert cached.is_file() and str(cached).startswith(str(caches / "torch" / "hub" / "checkpoints"))
    src.unlink()                                    # the second start reads the cache only
    assert _equal(build_model(_cfg(init=url)), a.state_dict())


def test_init_bad_sources_are_one_line(caches):
    from ns_plugin.training.loop import build_model
    a, _ = _two_models()
    path = caches / "ten.pth"
    torch.save({"state_dict": a.state_dict()}, path)
    t0 = time.time()
    with pytest.raises(NSPluginError, match=r"checkpoint http://127.0.0.1:9/x.pth cannot be downloaded"):
        build_model(_cfg(init="http://127.0.0.1:9/x.pth"))
    assert time.time() - t0 < 10
    with pytest.raises(NSPluginError, match=r"nope.pth: does not exist"):
        build_model(_cfg(init=str(caches / "nope.pth")))
    with pytest.raises(NSPluginError, match=r"has 10 classes, not num_classes=5"):
        build_model(_cfg(init=str(path), num_classes=5))
