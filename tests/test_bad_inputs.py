"""Every bad input is one line (issue 11): a table of bad CLI invocations and API calls, each of which must end
with exit status 2 (CLI) or an NSPluginError (API), a one-line message naming the problem, no traceback and
no file left behind. Plus the positive side of the same checks: 16-bit / palette / grey / RGBA images are read
correctly, an `evaluate` folder is matched to the model's classes by name, a resume with a changed eps is
refused, and a comparison that fails after starting ends with run.json saying "failed".

The CLI cases run in-process through ``ns_plugin.cli.main`` (fast); one runs as a real subprocess to check the
console script end to end. No case trains or downloads a model: checkpoints are random-weight embedded ViTs.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ns_plugin.errors import NSPluginError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad (and a few good) input files, made once: they live outside the folder each case runs in."""
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.models import build_default_model
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    (d / "zero.pth").write_bytes(b"")
    (d / "text.pth").write_text("this is not a checkpoint\n")
    torch.manual_seed(0)
    good = build_default_model()
    save_checkpoint(d / "good.pth", good, meta={"arch": "ns_vit_digits"})
    raw = (d / "good.pth").read_bytes()
    (d / "trunc.pth").write_bytes(raw[: len(raw) // 2])
    (d / "ckdir").mkdir()
    bad = build_default_model()
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))
    save_checkpoint(d / "nan.pth", bad)
    save_checkpoint(d / "five.pth", build_default_model(num_classes=5))
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("x")}, d / "pickled.pth")
    # image folders: 11 classes; one class 'cat'; and a plain file where a folder is expected
    for k in range(11):
        (d / "eleven" / f"c{k:02d}").mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * k, np.uint8)).save(d / "eleven" / f"c{k:02d}" / "a.png")
    (d / "cats" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "cats" / "cat" / "a.png")
    (d / "afile").write_text("x")
    for k in range(10):
        (d / "notimg" / f"c{k}").mkdir(parents=True)
        (d / "notimg" / f"c{k}" / "b.png").write_text("not a png")
    for name, text in {
        "seed_abc.yaml": "seed: abc\n", "data5.yaml": "data: 5\n", "unknown.yaml": "foo: 1\n",
        "list.yaml": "- a\n- b\n", "badyaml.yaml": "a: [1, 2\n", "ema_maybe.yaml": "model_ema: maybe\n",
        "rounds_abc.yaml": "base: demo\ntraining: {rounds: abc}\n", "name5.yaml": "base: demo\nname: 5\n",
        "table4.yaml": "base: demo\ntables: {table4: [['0.1', 'ViT']]}\n", "evallist.yaml": "base: demo\neval: [1, 2]\n",
        "resnet.yaml": "base: demo\nmodel: resnet18\n", "nattack.yaml": "base: demo\neval: {n_attack: -5}\n",
        "runs_empty.yaml": "base: demo\nruns: []\n",
        "dup.yaml": "base: demo\nruns: [{name: a, method: ns}, {name: a, method: ns}]\ntables: {}\n",
        "sev.yaml": "base: demo\neval: {severities: [0, 9]}\n", "corr.yaml": "base: demo\neval: {corruptions: [foggy]}\n",
        "run_eps.yaml": "base: demo\nruns: [{name: a, method: ns, eps: -1}]\ntables: {}\n",
        "nodata.yaml": f"base: demo\ndata: {d / 'cats'}\n",
    }.items():
        (d / name).write_text(text)
    return d


def _files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------- the CLI table
# (id, argv with {i} = the inputs folder and {w} = the (empty) working folder, expected text in the message)
TRAIN_FAST = ["--method", "standard", "--rounds", "1", "--steps-per-round", "1", "--batch-size", "4",
              "--train-limit", "4", "--progress", "false", "--plot", "false"]
CLI_CASES = [
    ("train-seed-abc", ["train", "--seed", "abc"], "--seed"),
    ("train-seed-float", ["train", "--seed", "1.5"], "integer"),
    ("train-data-5", ["train", "--data", "5"], "does not exist"),
    ("train-image-size-neg", ["train", "--image-size", "-4"], "--image-size"),
    ("train-bool-maybe", ["train", "--model-ema", "maybe"], "true or false"),
    ("train-lr-nan", ["train", "--lr", "nan"], "--lr"),
    ("train-eps-zero", ["train", "--eps", "0"], "out of range"),
    ("train-batch-zero", ["train", "--batch-size", "0"], "--batch-size"),
    ("train-unknown-model", ["train", "--model", "resnet1800"], "timm model name"),
    ("train-unknown-method", ["train", "--method", "nss"], "nss"),
    ("train-unknown-flag", ["train", "--epz", "1"], "unrecognized"),
    ("train-yaml-seed", ["train", "--config", "{i}/seed_abc.yaml"], "seed"),
    ("train-yaml-data", ["train", "--config", "{i}/data5.yaml"], "data"),
    ("train-yaml-unknown", ["train", "--config", "{i}/unknown.yaml"], "unknown key"),
    ("train-yaml-list", ["train", "--config", "{i}/list.yaml"], "mapping"),
    ("train-yaml-invalid", ["train", "--config", "{i}/badyaml.yaml"], "not valid YAML"),
    ("train-yaml-bool", ["train", "--config", "{i}/ema_maybe.yaml"], "model_ema"),
    ("train-config-folder", ["train", "--config", "{i}"], "folder"),
    ("train-config-binary", ["train", "--config", "{i}/good.pth"], "not a text"),
    ("demo-config-binary", ["demo", "--config", "{i}/good.pth"], "not a text"),
    ("train-config-missing", ["train", "--config", "{i}/missing.yaml"], "does not exist"),
    ("train-checkpoint-zero", ["train", "--init", "{i}/zero.pth", "--out", "{w}/R"] + TRAIN_FAST, "empty"),
    ("train-checkpoint-folder", ["train", "--init", "{i}/ckdir"], "folder"),
    ("train-out-is-file", ["train", "--out", "{i}/afile"] + TRAIN_FAST, "is a file"),
    ("train-out-under-file", ["train", "--out", "{i}/afile/R"] + TRAIN_FAST, "file"),
    ("train-resume-nothing", ["train", "--resume", "--out", "{w}/R"] + TRAIN_FAST, "nothing to resume"),
    ("train-11-classes", ["train", "--init", "{i}/good.pth", "--data", "{i}/eleven", "--out", "{w}/R"]
     + TRAIN_FAST, "11 classes but the model has 10"),
    ("train-image-size", ["train", "--init", "{i}/good.pth", "--data", "{i}/eleven", "--image-size", "4",
                          "--out", "{w}/R"] + TRAIN_FAST, "input size 32"),
    ("train-five-class-ckpt", ["train", "--init", "{i}/five.pth", "--out", "{w}/R"] + TRAIN_FAST,
     "10 classes but the model has 5"),
    ("train-limit-zero", ["train", "--train-limit", "0"], "--train-limit"),
    ("train-num-classes-default", ["train", "--num-classes", "5", "--out", "{w}/R"] + TRAIN_FAST, "10 classes"),
    ("train-bad-image", ["train", "--init", "{i}/good.pth", "--data", "{i}/notimg", "--out", "{w}/R"]
     + TRAIN_FAST, "b.png"),
    ("eval-batch-neg", ["evaluate", "--batch-size", "-5"], "--batch-size"),
    ("eval-batch-zero", ["evaluate", "--batch-size", "0"], "--batch-size"),
    ("eval-ckpt-zero", ["evaluate", "--checkpoint", "{i}/zero.pth"], "empty"),
    ("eval-ckpt-text", ["evaluate", "--checkpoint", "{i}/text.pth"], "not a readable torch file"),
    ("eval-ckpt-trunc", ["evaluate", "--checkpoint", "{i}/trunc.pth"], "not a readable torch file"),
    ("eval-ckpt-folder", ["evaluate", "--checkpoint", "{i}/ckdir"], "is a folder"),
    ("eval-ckpt-missing", ["evaluate", "--checkpoint", "{i}/missing.pth"], "does not exist"),
    ("eval-ckpt-nan", ["evaluate", "--checkpoint", "{i}/nan.pth"], "NaN"),
    ("eval-ckpt-pickled", ["evaluate", "--checkpoint", "{i}/pickled.pth"], "trust"),
    ("eval-five-classes", ["evaluate", "--checkpoint", "{i}/five.pth"], "10 classes but the model has 5"),
    ("eval-wrong-class-names", ["evaluate", "--checkpoint", "{i}/good.pth", "--data", "{i}/cats"], "classes"),
    ("eval-data-file", ["evaluate", "--data", "{i}/afile"], "not a folder"),
    ("demo-rounds-abc", ["demo", "--config", "{i}/rounds_abc.yaml", "--out", "{w}/D"], "training.rounds"),
    ("demo-name-5", ["demo", "--config", "{i}/name5.yaml", "--out", "{w}/D"], "name"),
    ("demo-table4-row", ["demo", "--config", "{i}/table4.yaml", "--out", "{w}/D"], "table4"),
    ("demo-eval-list", ["demo", "--config", "{i}/evallist.yaml", "--out", "{w}/D"], "eval must be a mapping"),
    ("demo-resnet", ["demo", "--config", "{i}/resnet.yaml", "--out", "{w}/D"], "not a vision transformer"),
    ("demo-n-attack", ["demo", "--config", "{i}/nattack.yaml", "--out", "{w}/D"], "n_attack"),
    ("demo-runs-empty", ["demo", "--config", "{i}/runs_empty.yaml", "--out", "{w}/D"], "runs"),
    ("demo-runs-dup", ["demo", "--config", "{i}/dup.yaml", "--out", "{w}/D"], "twice"),
    ("demo-severities", ["demo", "--config", "{i}/sev.yaml", "--out", "{w}/D"], "severities"),
    ("demo-corruptions", ["demo", "--config", "{i}/corr.yaml", "--out", "{w}/D"], "foggy"),
    ("demo-run-eps", ["demo", "--config", "{i}/run_eps.yaml", "--out", "{w}/D"], "eps"),
    ("demo-data-layout", ["demo", "--config", "{i}/nodata.yaml", "--out", "{w}/D"], "imagenet-val"),
    ("demo-out-file", ["demo", "--out", "{i}/afile"], "is a file"),
    ("demo-config-missing", ["demo", "--config", "{i}/nope.yaml"], "does not exist"),
    ("nullspace-figure-suffix", ["nullspace", "--figure", "{w}/f.xyz"], "matplotlib cannot write"),
    ("nullspace-figure-dir", ["nullspace", "--figure", "{i}"], "folder"),
    ("nullspace-scale-nan", ["nullspace", "--figure", "{w}/f.png", "--scale", "nan"], "--scale"),
    ("watermark-jpeg", ["watermark", "digits:0", "text:NS", "--out", "{w}/w.jpg"], "lossless"),
    ("watermark-figure-dir", ["watermark", "digits:0", "text:NS", "--out", "{w}/w.png", "--save-tensor",
                              "{w}/w.pt", "--figure", "{i}"], "folder"),
    ("watermark-figure-suffix", ["watermark", "digits:0", "text:NS", "--out", "{w}/w.png", "--figure",
                                 "{w}/f.docx"], "matplotlib cannot write"),
    ("watermark-out-dir", ["watermark", "digits:0", "text:NS", "--out", "{i}"], "folder"),
    ("watermark-image-text", ["watermark", "{i}/afile", "text:NS", "--checkpoint", "{i}/good.pth",
                              "--out", "{w}/w.png"], "image"),
    ("noise-eps-neg", ["noise", "--eps", "-1"], "--eps"),
    ("noise-out-dir", ["noise", "--out", "{i}"], "folder"),
    ("noise-data-missing", ["noise", "--data", "{i}/nothere"], "does not exist"),
    ("fingerprint-threshold", ["fingerprint", "a", "b", "--threshold", "5"], "--threshold"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2_no_files(case, inputs, tmp_path, monkeypatch, capsys):
    from ns_plugin import cli
    name, argv, expect = case
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("NS_PLUGIN_CACHE", str(tmp_path / "cache"))   # never ~/.cache; nothing may train
    before_inputs = _files(inputs)
    argv = [a.format(i=inputs, w=work) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse exits from parse_args
        rc = e.code
    out, err = capsys.readouterr()
    err = err.strip()
    assert rc == 2, (name, rc, err)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("ns-plugin") and expect in err, err
    assert _files(work) == [], f"{name} left files: {_files(work)}"
    assert _files(inputs) == before_inputs
    assert not (tmp_path / "cache").exists()


def test_console_script_bad_input_end_to_end(tmp_path):
    """The real console entry (a subprocess): one line on stderr, exit 2, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NS_PLUGIN_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "ns_plugin", "evaluate", "--batch-size", "-5"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--batch-size" in p.stderr and _files(tmp_path) == []


# --------------------------------------------------------------------------------------- the API table
def _model():
    from ns_plugin.models import build_default_model
    torch.manual_seed(0)
    return build_default_model().eval()


def _api_cases():
    from ns_plugin import exact_nullspace, load_config, read_checkpoint, search_noise
    from ns_plugin.attacks import NullspaceNoise, PatchFool
    from ns_plugin.data import image_folder, read_image
    from ns_plugin.evaluation.harness import load_comparison_config
    from ns_plugin.io import claim_output

    def claim(p):
        with claim_output(p):
            pass

    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    return [
        ("ckpt-zero", lambda i: read_checkpoint(i / "zero.pth"), "empty"),
        ("ckpt-text", lambda i: read_checkpoint(i / "text.pth"), "not a readable torch file"),
        ("ckpt-trunc", lambda i: read_checkpoint(i / "trunc.pth"), "not a readable torch file"),
        ("ckpt-folder", lambda i: read_checkpoint(i / "ckdir"), "is a folder"),
        ("ckpt-nan", lambda i: read_checkpoint(i / "nan.pth"), "NaN"),
        ("cfg-seed-str", lambda i: load_config(seed="abc"), "seed"),
        ("cfg-seed-float", lambda i: load_config(seed=1.5), "seed"),
        ("cfg-bool-str", lambda i: load_config(model_ema="maybe"), "model_ema"),
        ("cfg-bool-int", lambda i: load_config(probe=2), "probe"),
        ("cfg-lr-nan", lambda i: load_config(lr=float("nan")), "lr"),
        ("cfg-eps-str", lambda i: load_config(eps="abc"), "eps"),
        ("cfg-rounds-list", lambda i: load_config(rounds=[1]), "rounds"),
        ("cfg-data-int", lambda i: load_config(data=5), "data"),
        ("cfg-unknown", lambda i: load_config(epz=1), "unknown"),
        ("cmp-eval-list", lambda i: load_comparison_config(None, eval=[1]), "eval"),
        ("cmp-n-attack", lambda i: load_comparison_config(None, eval={"n_attack": 0}), "n_attack"),
        ("cmp-training-nan", lambda i: load_comparison_config(None, training={"lr": float("nan")}), "lr"),
        ("patchfool-steps", lambda i: PatchFool(_model(), steps=-5), "steps"),
        ("patchfool-lr-str", lambda i: PatchFool(_model(), lr="fast"), "lr"),
        ("patchfool-empty", lambda i: PatchFool(_model(), steps=1)(x[:0], y[:0]), "empty"),
        ("patchfool-float64", lambda i: PatchFool(_model(), steps=1)(x.double(), y), "float64"),
        ("ns-noise-std-inf", lambda i: NullspaceNoise(_model(), std=math.inf), "std"),
        ("ns-noise-std-nan", lambda i: NullspaceNoise(_model(), std=float("nan")), "std"),
        ("exact-tol-nan", lambda i: exact_nullspace(_model(), tol=float("nan")), "tol"),
        ("figure2-scale-nan", lambda i: __import__("ns_plugin.nullspace.exact", fromlist=["figure2"]).figure2(
            _model(), i / "f.png", scale=float("nan")), "scale"),
        ("sample-scale-inf", lambda i: exact_nullspace(_model()).sample(2, math.inf), "scale"),
        ("exact-tol-neg", lambda i: exact_nullspace(_model(), tol=-1.0), "tol"),
        ("search-eps-str", lambda i: search_noise(_model(), x, eps="a"), "eps"),
        ("search-lr-nan", lambda i: search_noise(_model(), x, lr=float("nan")), "lr"),
        ("search-wd-str", lambda i: search_noise(_model(), x, weight_decay="x"), "weight_decay"),
        ("search-empty", lambda i: search_noise(_model(), x[:0]), "empty"),
        ("image-text-file", lambda i: read_image(i / "afile"), "cannot read"),
        ("image-folder-file", lambda i: image_folder(i / "afile"), "is a file"),
        ("image-folder-not-images", lambda i: image_folder(i / "notimg").__getitem__(0), "b.png"),
        ("claim-file", lambda i: claim(i / "afile"), "is a file"),
    ]


API_IDS = ["ckpt-zero", "ckpt-text", "ckpt-trunc", "ckpt-folder", "ckpt-nan", "cfg-seed-str", "cfg-seed-float",
           "cfg-bool-str", "cfg-bool-int", "cfg-lr-nan", "cfg-eps-str", "cfg-rounds-list", "cfg-data-int",
           "cfg-unknown", "cmp-eval-list", "cmp-n-attack", "cmp-training-nan", "patchfool-steps",
           "patchfool-lr-str", "patchfool-empty", "patchfool-float64", "ns-noise-std-inf", "ns-noise-std-nan",
           "exact-tol-nan", "figure2-scale-nan", "sample-scale-inf", "exact-tol-neg",
           "search-eps-str", "search-lr-nan", "search-wd-str", "search-empty",
           "image-text-file", "image-folder-file", "image-folder-not-images", "claim-file"]


@pytest.mark.parametrize("case_id", API_IDS)
def test_api_bad_input_raises_one_line_nspluginerror(case_id, inputs, tmp_path, monkeypatch):
    cases = {c[0]: c for c in _api_cases()}
    assert set(cases) == set(API_IDS)
    _, call, expect = cases[case_id]
    monkeypatch.chdir(tmp_path)
    before = _files(inputs)
    with pytest.raises(NSPluginError) as e:
        call(inputs)
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg
    assert _files(tmp_path) == [] and _files(inputs) == before


def test_the_tables_hold_at_least_forty_cases():
    assert len(CLI_CASES) + len(API_IDS) >= 40 and len(CLI_CASES) >= 40


# --------------------------------------------------------------------------------------- readers, positive
def test_images_16bit_palette_grey_rgba_are_converted(tmp_path):
    from PIL import Image
    from ns_plugin.data import read_image
    g16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    t = read_image(tmp_path / "g16.png")
    assert t.shape == (1, 16, 16) and torch.allclose(t[0], torch.from_numpy(g16 / 65535.0).float(), atol=1e-6)
    assert float((t >= 0.999).float().mean()) < 0.01          # not saturated
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    t = read_image(tmp_path / "pal.png")
    assert t.shape == (3, 2, 2) and t[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and t[:, 0, 1].tolist() == [0.0, 0.0, 1.0]
    Image.fromarray(np.full((4, 4), 51, np.uint8), mode="L").save(tmp_path / "g.png")
    assert torch.allclose(read_image(tmp_path / "g.png", channels=3), torch.full((3, 4, 4), 0.2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [0, 0, 0, 255]      # opaque black
    rgba[0, 1] = [0, 0, 0, 0]        # fully transparent -> white background
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png")
    assert t[:, 0, 0].tolist() == [0.0, 0.0, 0.0] and t[:, 0, 1].tolist() == [1.0, 1.0, 1.0]
    # an image folder of 16-bit files is read the same way (no saturation)
    (tmp_path / "f" / "3").mkdir(parents=True)
    Image.fromarray(g16).save(tmp_path / "f" / "3" / "a.png")
    from ns_plugin.data import image_folder
    x, _ = image_folder(tmp_path / "f")[0]
    assert x.shape == (3, 16, 16) and abs(float(x.mean()) - g16.mean() / 65535) < 1e-5


def test_evaluate_matches_folder_classes_by_name(tmp_path, capsys):
    """A folder holding only digit class '7' is scored against label 7 (not 0, as ImageFolder numbers it):
    a model that always answers 7 scores 100% on it."""
    from ns_plugin import cli
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.data import save_image_folder
    model = _model()
    with torch.no_grad():
        model[1].head.weight.zero_()
        model[1].head.bias.zero_()
        model[1].head.bias[7] = 10.0
    save_image_folder(tmp_path / "sevens", torch.rand(6, 3, 32, 32), torch.zeros(6, dtype=torch.long), classes=["7"])
    save_checkpoint(tmp_path / "m.pth", model, meta={"arch": "ns_vit_digits", "config": {"data": "digits"}})
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "m.pth"), "--data", str(tmp_path / "sevens")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == {"n": 6, "clean_acc": 100.0}, res


def test_resume_refuses_a_changed_setting(tmp_path, digits):
    from ns_plugin.training import load_config, train
    from ns_plugin.models import build_default_model
    from torch.utils.data import TensorDataset
    x, y = digits.train.tensors
    ds = TensorDataset(x[:16], y[:16])
    kw = dict(method="standard", rounds=2, steps_per_round=1, batch_size=8, plot=False)
    torch.manual_seed(0)
    train(load_config(**kw, eps=0.03, progress=False), tmp_path / "R", model=build_default_model(), train_set=ds)
    with pytest.raises(NSPluginError) as e:
        train(load_config(**kw, eps=0.05, noise_max_steps=7, progress=True), tmp_path / "R", resume=True,
              model=build_default_model(), train_set=ds)
    msg = str(e.value)
    assert "\n" not in msg and "eps=0.03" in msg and "eps=0.05" in msg and "noise_max_steps=3000" in msg
    assert "progress" not in msg and "another --out" in msg, msg
