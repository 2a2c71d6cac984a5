"""Paper-scale comparisons start from real weights and fail fast: the paper configs' rows and settings, a
comparison whose rows start from (and are evaluated only from) weights in the Hugging Face cache layout and
an EasyRobust-format checkpoint, and the preflight table that stops bad input before any training. Runs on
timm's tiny ``test_vit`` and a toy ImageNet-layout folder, with temporary HF / torch hub caches."""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ns_plugin.errors import NSPluginError

from test_weights import TINY, TINY_REPO, caches, put_in_hf_cache  # noqa: F401  (caches is a fixture)

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "compare"
DAT_URL = ("http://alisec-competition.oss-cn-shanghai.aliyuncs.com/xiaofeng/easy_robust/benchmark_models/ours/"
           "examples/dat/model_best.pth.tar")   # EasyRobust README, model zoo: DAT ViT-B/16


def toy_imagenet(root: Path, classes=3, n_train=4, n_val=2, size=160):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("imagenet-val", n_val)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _resolved(path):
    from ns_plugin.evaluation.harness import Comparison, load_comparison_config
    from ns_plugin.validation import without_path_checks
    with without_path_checks():                               # written for a machine with ImageNet
        cfg = load_comparison_config(path)
        return cfg, Comparison(cfg, "/nonexistent/never-written", progress=False).resolved()


def test_paper_configs_list_the_papers_rows_with_the_papers_settings():
    import timm
    b, rb = _resolved(CONFIGS / "imagenet_vit_b.yaml")
    s, rs = _resolved(CONFIGS / "imagenet_vit_s.yaml")
    assert [r["name"] for r in b["runs"]] == ["ViT-B", "ViT-B + NS", "DAT", "DAT + NS"]
    assert [r["name"] for r in s["runs"]] == ["ViT-S", "ViT-S + NS", "NS eps=0.01", "NS eps=0.1", "random eps=0.01",
                                              "random eps=0.03", "random eps=0.1", "Madry", "TRADES"]
    assert b["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and timm.is_model(b["model"])
    assert s["model"] == "vit_small_patch16_224.augreg_in21k_ft_in1k" and timm.is_model(s["model"])
    dat, dat_ns = b["runs"][2], b["runs"][3]
    assert dat["method"] is None and dat["init"] == DAT_URL and dat["init_ema"] is True        # as released
    assert dat_ns["init"] == DAT_URL and dat_ns["model_ema"] is True and dat_ns["vqgan"] == "openimages_f8_16384"
    for cfg, res in ((b, rb), (s, rs)):
        assert cfg["base"] == "paper"
        for name, settings in res["runs"].items():
            assert not any("demo" in v["from"] for v in settings.values()), name       # nothing from the demo
            if "evaluate_only" in settings:
                continue
            v = {k: x["value"] for k, x in settings.items()}
            assert (v["rounds"], v["steps_per_round"], v["batch_size"], v["lr"]) == (20, 40, 128, 1e-5), name
            assert (v["eps"] if "eps=" not in name else True) == 0.03 or name.startswith(("random", "NS eps"))
            assert (v["lim"], v["noise_lr"], v["noise_max_steps"], v["search_batch_size"]) == (3.0, 0.1, 3000, 128)
            assert (v["pgd_eps"], v["pgd_alpha"], v["pgd_steps"]) == (8 / 255, 2 / 255, 10)
            assert v["pretrained"] is True and v["warm_start"] is False
        assert cfg["eval"]["fgsm_eps"] == 1 / 255
    assert rs["runs"]["NS eps=0.01"]["eps"]["value"] == 0.01
    assert rb["runs"]["ViT-B"]["pretrained"] == {"value": True, "from": "config training block"}


def _er_checkpoint(path, classes=3):
    """An EasyRobust release in miniature: CheckpointSaver dict, Sequential keys, DDP prefixes, an args
    Namespace, and EMA weights that differ from the raw ones."""
    import timm
    from ns_plugin.models import wrap
    torch.manual_seed(3)
    raw = wrap(timm.create_model(TINY, num_classes=classes), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ema = wrap(timm.create_model(TINY, num_classes=classes), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.save({"epoch": 9, "arch": TINY, "version": 2, "metric": 1.0,
                "state_dict": {f"module.{k}": v for k, v in raw.state_dict().items()},
                "state_dict_ema": ema.state_dict(), "args": argparse.Namespace(model=TINY, model_ema=True)}, path)
    return ema.state_dict()


def test_comparison_rows_start_from_hub_cache_and_easyrobust_checkpoints(caches, tmp_path):  # noqa: F811
    """The Done-when of issue 13: weights in the HF cache layout and an EasyRobust-format checkpoint (file and
    URL) both start fine-tuning runs and evaluate-only rows; amp without CUDA is recorded as what ran."""
    import timm
    from safetensors.torch import load_file
    from ns_plugin.evaluation.harness import load_comparison_config, run_comparison
    torch.manual_seed(1)
    hub_dir = put_in_hf_cache(caches / "hf" / "hub", TINY_REPO, timm.create_model(TINY).state_dict())
    er = tmp_path / "release" / "model_best.pth.tar"
    er.parent.mkdir()
    er_ema = _er_checkpoint(er)
    data = toy_imagenet(tmp_path / "data")
    cfg = load_comparison_config(None, name="paperscale_tiny", base="paper", data=str(data), model=TINY,
                                 training={"pretrained": True, "num_classes": 3, "rounds": 1, "steps_per_round": 1,
                                           "batch_size": 4, "amp": True, "plot": False},
                                 runs=[{"name": "hub", "method": None},
                                       {"name": "hub + FT", "method": "standard"},
                                       {"name": "ER", "method": None, "init": str(er), "init_ema": True},
                                       {"name": "ER + FT", "method": "standard", "init": er.as_uri(),
                                        "init_ema": True}],
                                 eval={"n_attack": 4, "skip": ["PGD", "CW", "PatchFool", "DamageNet", "A", "C", "V2",
                                                               "R", "Sketch", "Stylized"]},
                                 tables={"table2": ["hub", "hub + FT", "ER", "ER + FT"]})
    out = tmp_path / "res"
    lines = []
    res = run_comparison(cfg, out, progress=False, log=lines.append)
    assert "pretrained weights of test_vit" in lines[0] and "present" in lines[0]
    assert set(res["rows"]) == {"hub", "hub + FT", "ER", "ER + FT"}
    assert all(res["rows"][n]["Clean"] is not None and res["rows"][n]["FGSM"] is not None for n in res["rows"])
    # evaluate-only rows hold exactly the weights they were built from
    cached = load_file(str(next(hub_dir.glob("snapshots/*/model.safetensors"))))
    hub = torch.load(out / "checkpoints" / "hub.pth", weights_only=True)
    assert all(torch.equal(hub["state_dict"][f"1.{k}"], v) for k, v in cached.items() if not k.startswith("head."))
    assert hub["meta"]["source"] == {"pretrained": True, "init": None, "init_ema": False}
    erck = torch.load(out / "checkpoints" / "er.pth", weights_only=True)
    assert all(torch.equal(erck["state_dict"][k], v) for k, v in er_ema.items())
    # the URL row downloaded the release once into the (temporary) torch hub cache
    assert list((caches / "torch" / "hub" / "checkpoints").glob("*-model_best.pth.tar"))
    # what ran is what is recorded: no CUDA here, so amp false with the reason
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["runs"]["hub + FT"]["amp"]["value"] is False and "no CUDA" in resolved["runs"]["hub + FT"]["amp"]["from"]
    assert resolved["runs"]["ER"]["evaluate_only"]["value"] is True
    ft = torch.load(out / "checkpoints" / "er___ft.pth", weights_only=True)
    assert ft["meta"]["train_config"]["amp"] is False and ft["meta"]["train_config"]["init_ema"] is True


def _cfg(data, **kw):
    from ns_plugin.evaluation.harness import load_comparison_config
    base = dict(name="bad", base="paper", data=str(data), model=TINY, training={"pretrained": True, "num_classes": 3},
                runs=[{"name": "base", "method": None}, {"name": "NS", "method": "ns"}],
                eval={"skip": ["DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]}, tables={})
    base.update(kw)
    return load_comparison_config(None, **base)


def _stops(cfg, out, match):
    from ns_plugin.evaluation.harness import Comparison
    lines = []
    t0 = time.time()
    with pytest.raises(NSPluginError, match=match) as e:
        Comparison(cfg, out, progress=False, log=lines.append).preflight(network=False)
    assert time.time() - t0 < 10 and "\n" not in str(e.value)
    assert not out.exists()                       # nothing written before the checks pass
    return lines[0]


def test_preflight_stops_bad_input_in_one_line_before_training(caches, tmp_path):  # noqa: F811
    data = toy_imagenet(tmp_path / "data", n_train=1, n_val=1, size=8)
    out = tmp_path / "res"
    # offline, weights not cached: the table names the cache; the error names the model
    table = _stops(_cfg(data), out, r"pretrained weights of test_vit: not in the Hugging Face cache .*HF_HUB_OFFLINE")
    assert "column Clean" in table and "column R" in table and "skipped" in table
    put_in_hf_cache(caches / "hf" / "hub", TINY_REPO, {"x": torch.zeros(1)})
    # a model name timm does not know
    with pytest.raises(NSPluginError, match=r"model 'test_vitt' is neither 'default' nor a timm model name; did you "
                                            r"mean 'test_vit'"):
        _cfg(data, model="test_vitt")                # caught when the config is read (ns_plugin.validation)
    # a checkpoint whose classes differ from the data's
    ck = tmp_path / "five.pth"
    _er_checkpoint(ck, classes=5)
    _stops(_cfg(data, runs=[{"name": "five", "method": None, "init": str(ck)}]), out,
           r"classes of 'five': the model has 5 classes but the data has 3")
    # an init URL that cannot be reached (a closed local port: fails at once)
    _stops(_cfg(data, runs=[{"name": "u", "method": None, "init": "http://127.0.0.1:9/dat.pth"}]), out,
           r"checkpoint http://127.0.0.1:9/dat.pth cannot be downloaded .*Connection refused")
    # a benchmark column whose folder is missing
    _stops(_cfg(data, eval={"skip": ["DamageNet", "A", "C", "V2", "Sketch", "Stylized"]}), out,
           r"column R: no folder .*imagenet-r; add it .* or list R under eval.skip")


def test_preflight_finds_the_installed_autoattack(tmp_path):
    """``eval.autoattack`` is checked against the ``autoattack`` the install step adds (fra31's, as vendored by
    easyrobust), not against a module that no longer exists."""
    from ns_plugin.evaluation.harness import load_comparison_config
    from ns_plugin.evaluation.preflight import preflight
    cfg = load_comparison_config(None, eval={"autoattack": {"eps": 8 / 255, "version": "standard"}})
    row = next(r for r in preflight(cfg, tmp_path / "out", network=False).rows if r.item == "column AutoAttack")
    assert row.state == "present" and "fra31" in row.detail, row
