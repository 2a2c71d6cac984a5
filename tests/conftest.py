"""Shared fixtures: the real embedded data and one trained tiny ViT per test session.

The whole session (and every subprocess it starts) uses a temporary ``NS_PLUGIN_CACHE``: no test reads or
writes the user's cache. Tests whose code asks for the default model (``model: default``, the CLI without
``--checkpoint``) use the ``default_model_cache`` fixture: the session's trained model is put there as the
cached embedded default, so nothing trains it again.
"""
import os
import shutil
import tempfile
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
# NS_PLUGIN_TEST_THREADS=1 on a machine shared with other jobs: two OpenMP threads per process were ~50x slower
torch.set_num_threads(int(os.environ.get("NS_PLUGIN_TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))

_CACHE = tempfile.mkdtemp(prefix="ns_plugin_test_cache_")
os.environ["NS_PLUGIN_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a loaded 2-core machine two OpenMP threads per process made the
    small noise searches ~50x slower (58 s instead of 1.1 s measured here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits():
    from ns_plugin.data import load_digits
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def trained(digits):
    """(model, metrics): the embedded default as shipped in the package (SHA-256 checked), the same model on
    every machine; loading it replaces ~45 s of training per session."""
    from ns_plugin.embedded import default_model
    model, metrics = default_model(progress=False)
    return model, metrics


@pytest.fixture(scope="session")
def default_model_cache(trained):
    """The session's trained model as the cached embedded default in the temporary cache (what
    ``ns_plugin.embedded.default_model()`` would train and cache: same data, seed and schedule)."""
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.embedded import cache_dir
    model, metrics = trained
    path = cache_dir() / "vit_digits_s0_e30.pth"
    save_checkpoint(path, model, meta={"arch": "ns_vit_digits", "seed": 0, "epochs": 30, "metrics": metrics})
    return path


@pytest.fixture
def model(trained):
    """A fresh copy of the trained model for tests that may modify it."""
    import copy
    return copy.deepcopy(trained[0]).eval()
