"""Output folders are owned (issue 11): a second writer fails in one line naming the holder's PID, a lock
left by a killed process is taken over, and temp files a killed writer left behind are removed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ns_plugin.errors import NSPluginError

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from ns_plugin.io import claim_output\n"
        "with claim_output(sys.argv[1], what='holder'):\n"
        "    print('held', flush=True); time.sleep(120)\n")


def _holder(folder):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_fails_naming_the_pid_then_stale_lock_and_temps_are_taken_over(tmp_path, capsys):
    from ns_plugin import cli
    from ns_plugin.io import LOCK_NAME, claim_output
    out = tmp_path / "R"
    p = _holder(out)
    try:
        with pytest.raises(NSPluginError, match=rf"output folder .*R is in use by PID {p.pid} \(holder"):
            with claim_output(out, what="second"):
                pass
        # the CLI: the train command refuses in one line, exit 2, and writes nothing into the folder
        rc = cli.main(["train", "--method", "standard", "--rounds", "1", "--steps-per-round", "1",
                       "--train-limit", "8", "--batch-size", "8", "--progress", "false", "--plot", "false",
                       "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and f"PID {p.pid}" in err, err
        assert sorted(x.name for x in out.iterdir()) == [LOCK_NAME]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the holder was killed: its lock file stays, naming a dead PID; a temp file of a "killed write" too
    assert (out / LOCK_NAME).is_file()
    (out / "sub").mkdir()
    stale = out / "sub" / ".last.pth.ab12_xyz.tmp"
    stale.write_bytes(b"half")
    keep = out / ".hidden.tmp"            # not one of our temp names: left alone
    keep.write_text("x")
    with claim_output(out, what="third") as held:
        assert held == out and not stale.exists() and keep.exists()
    assert not (out / LOCK_NAME).exists()   # released on exit
    # a folder no ns_plugin writer was killed in is never swept (it may be the user's own folder)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".notes.txt.ab12_xyz.tmp").write_text("user data")
    with claim_output(mine):
        pass
    assert (mine / ".notes.txt.ab12_xyz.tmp").exists()


def test_refused_claims_leave_nothing_behind(tmp_path):
    from ns_plugin.io import claim_output
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NSPluginError, match="is a file"):
        with claim_output(f):
            pass
    with pytest.raises(NSPluginError, match="is a file"):
        with claim_output(f / "sub"):
            pass
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anywhere
            with pytest.raises(NSPluginError, match="permission denied|not writable"):
                with claim_output(ro / "x"):
                    pass
    finally:
        ro.chmod(0o700)
    # a run refused inside the block removes the folders the claim created
    with pytest.raises(NSPluginError, match="refused"):
        with claim_output(tmp_path / "a" / "b"):
            raise NSPluginError("refused")
    assert not (tmp_path / "a").exists()


def test_two_concurrent_claims_never_both_succeed(tmp_path):
    """Four processes race for one folder at the same moment: exactly one holds it, the others fail."""
    code = ("import os, sys, time; from ns_plugin.io import claim_output\n"
            "from ns_plugin.errors import NSPluginError\n"
            "go, release = sys.argv[2] + '/go', sys.argv[2] + '/release'\n"
            "while not os.path.exists(go): time.sleep(0.01)\n"
            "try:\n"
            "    with claim_output(sys.argv[1]):\n"
            "        print('won', flush=True)\n"
            "        while not os.path.exists(release): time.sleep(0.01)\n"
            "except NSPluginError as e:\n"
            "    print('lost', e, flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "R"), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    time.sleep(0.5)
    (tmp_path / "go").touch()
    t0 = time.time()
    while sum(p.poll() is not None for p in procs) < 3 and time.time() - t0 < 90:
        time.sleep(0.05)
    (tmp_path / "release").touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum(o.startswith("won") for o in outs) == 1, outs
    assert all("in use by PID" in o for o in outs if o.startswith("lost")), outs
