"""EasyRobust's scripts as they are: the ``train_one_epoch`` drop-in (Lighting's out-of-range pixels, a bare
model fed normalised images, the script's log line, one method key) and EasyRobust training YAMLs for
``ns-plugin train --config``."""
import argparse
import logging

import pytest
import torch

from ns_plugin.errors import NSPluginError

YAML = """\
model: vit_tiny_patch16_224
lr: 0.0005
epochs: 3
batch_size: 64
opt: adamw
weight_decay: 0.05
warmup_epochs: 0
workers: 8
pin_mem: true
output: /tmp/er_out
method: ns
"""


def test_easyrobust_yaml_maps_known_keys(tmp_path):
    from ns_plugin.training.config import TrainConfig, read_yaml
    p = tmp_path / "er.yaml"
    p.write_text(YAML)
    extras = {}
    d = read_yaml(str(p), extras=extras)
    assert d == {"model": "vit_tiny_patch16_224", "lr": 0.0005, "rounds": 3, "batch_size": 64, "weight_decay": 0.05,
                 "workers": 8, "method": "ns"}
    assert extras == {"out": "/tmp/er_out"}
    TrainConfig.from_dict(d).validate()


def test_easyrobust_yaml_refuses_senseless_keys_unless_told(tmp_path, caplog):
    from ns_plugin.training.config import read_yaml
    p = tmp_path / "er.yaml"
    p.write_text(YAML + "mixup: 0.8\ndrop_path: 0.1\nsmoothing: 0.1\n")
    with pytest.raises(NSPluginError, match=r"no ns_plugin counterpart for mixup=0.8.*epochs->rounds.*--ignore-unsupported"):
        read_yaml(str(p))
    with caplog.at_level(logging.WARNING):
        d = read_yaml(str(p), ignore_unsupported=True)
    assert "mixup" not in d and d["rounds"] == 3
    warned = [r.getMessage() for r in caplog.records if "ignoring keys" in r.getMessage()]
    assert len(warned) == 1 and "mixup=0.8" in warned[0] and "smoothing=0.1" in warned[0]
    p.write_text("epochs: 2\nrounds: 3\n")
    with pytest.raises(NSPluginError, match="sets 'rounds' twice"):
        read_yaml(str(p))
    p.write_text("methd: ns\n")
    with pytest.raises(NSPluginError, match="unknown key.s. .'methd'.; did you mean 'method'"):
        read_yaml(str(p), ignore_unsupported=True)
    p.write_text("opt: sgd\n")
    with pytest.raises(NSPluginError, match="opt='sgd' .ns_plugin fine-tunes with AdamW"):
        read_yaml(str(p))


def test_cli_train_accepts_easyrobust_yaml_and_refuses_with_exit_2(tmp_path, capsys):
    from ns_plugin.cli import main
    p = tmp_path / "er.yaml"
    p.write_text("model: default\nepochs: 1\nmixup: 0.8\n")
    assert main(["train", "--config", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "--ignore-unsupported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _loader(x, y, bs=8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


def test_train_one_epoch_takes_lighting_pixels_and_logs_like_the_script(model, digits, caplog):
    from ns_plugin.integrations import easyrobust as er
    x, y = digits.train.tensors
    x = x[:16].clone()
    x[:, 0] = x[:, 0] * 1.02 - 0.013            # what EasyRobust's PCA Lighting does: -0.013 ... 1.007
    args = argparse.Namespace(ns_method="standard", log_interval=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    er._warned.clear()
    with caplog.at_level(logging.INFO):
        out = er.train_one_epoch(0, model, _loader(x, y[:16]), opt, None, args)
        er.train_one_epoch(1, model, _loader(x, y[:16]), opt, None, args)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("clamping them to [0, 1]" in m for m in msgs) == 1              # warned once
    assert sum("alias of args.method" in m for m in msgs) == 1
    train_lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert len(train_lines) == 4 and train_lines[0].startswith("Train: 0 [   0/2 (  0%)]  Loss: ")
    assert "LR: 1.000e-04" in train_lines[0] and torch.isfinite(torch.tensor(out["loss"]))


def test_train_one_epoch_with_a_bare_model_on_normalised_inputs(model, digits):
    from ns_plugin.integrations import easyrobust as er
    norm, net = model[0], model[1]
    mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    x, y = digits.train.tensors
    xn = (x[:16] - norm.mean.view(1, 3, 1, 1)) / norm.std.view(1, 3, 1, 1)   # base_training_script's transform
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    with pytest.raises(NSPluginError, match="args.mean and args.std"):
        er.train_one_epoch(0, net, _loader(xn, y[:16]), opt, None, argparse.Namespace(method="madry"))
    before = net.head.weight.detach().clone()
    args = argparse.Namespace(method="madry", mean=mean, std=std, pgd_steps=1)
    out = er.train_one_epoch(0, net, _loader(xn, y[:16]), opt, None, args)
    assert torch.isfinite(torch.tensor(out["loss"])) and not torch.equal(before, net.head.weight)
    with pytest.raises(NSPluginError, match="disagree"):
        er.method_config(argparse.Namespace(method="ns", ns_method="madry"))
