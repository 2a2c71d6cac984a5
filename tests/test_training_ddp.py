"""DDP on CPU: torchrun with 2 gloo processes. The noise is searched on rank 0 and broadcast, so both ranks
train with the identical noise every round and end with identical weights, equal (up to float rounding)
to a single-process run with the same global batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ns_plugin.errors import NSPluginError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread", "default_model_cache")
CFG = dict(method="ns", rounds=2, steps_per_round=2, batch_size=8, train_limit=48, search_batch_size=16,
           lr=1e-3, progress=False, plot=False)

WORKER = r'''
import sys, torch
torch.set_num_threads(1)
from ns_plugin.training import load_config
from ns_plugin.training.loop import Trainer
out = sys.argv[1]
t = Trainer(load_config(world_size=2, **%r), out)
noises = []
begin = t.method.begin_round
def recording(tr, rnd):
    stats = begin(tr, rnd)
    noises.append(t.method.noise.detach().cpu().clone())
    return stats
t.method.begin_round = recording
t.run()
torch.save({"noises": noises, "state_dict": {k: v.detach().cpu() for k, v in t.raw.state_dict().items()}},
           f"{out}/rank{t.rank}.pt")
''' % (CFG,)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_share_noise_and_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-1500:]
    a, b = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert len(a["noises"]) == len(b["noises"]) == 2
    for na, nb in zip(a["noises"], b["noises"]):
        assert float(na.norm()) > 1.0 and torch.equal(na, nb)          # same noise on both ranks, every round
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # same weights
    assert (out / "model.pth").is_file() and (out / "last.pth").is_file()

    # the same global batches in one process give the same training (float rounding aside)
    from ns_plugin.training import load_config, train
    from ns_plugin.embedded import default_model
    start = default_model(progress=False)[0].state_dict()
    single = train(load_config(**CFG))
    sd = single["model"].state_dict()
    keys = [k for k in sd if sd[k].dtype.is_floating_point]
    d_single = torch.cat([(sd[k] - start[k]).flatten() for k in keys])
    d_ddp = torch.cat([(a["state_dict"][k] - start[k]).flatten() for k in keys])
    assert float(d_single.norm()) > 1e-2                      # training really moved the weights
    # AdamW turns float-rounding-sized gradients into lr-sized steps, so compare the updates as a whole
    assert float((d_ddp - d_single).norm() / d_single.norm()) < 0.05
    assert [r["noise_norm"] for r in single["log"]] == pytest.approx([float(n.norm()) for n in a["noises"]], rel=1e-3)

    # resuming the 2-process run in 1 process is refused, nothing is overwritten
    from ns_plugin.training.loop import Trainer
    stamp = (out / "last.pth").stat().st_mtime_ns
    with pytest.raises(NSPluginError, match=r"written by 2 process\(es\) but this launch has 1"):
        Trainer(load_config(**CFG), out, resume=True)
    assert (out / "last.pth").stat().st_mtime_ns == stamp
