"""ruff (configured in ruff.toml) is clean on the whole tree. ruff is installed by tools/bootstrap.sh."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         capture_output=True, text=True, cwd=ROOT)
    assert "No module named ruff" not in out.stderr, "ruff is not installed; run `make venv` (tools/bootstrap.sh)"
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
