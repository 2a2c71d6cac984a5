"""Shared fixtures: the real embedded data and one trained tiny ViT per test session."""
import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
# NS_PLUGIN_TEST_THREADS=1 on a machine shared with other jobs: two OpenMP threads per process were ~50x slower
torch.set_num_threads(int(os.environ.get("NS_PLUGIN_TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


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
    """(model, metrics): the embedded default trained once for the whole session (~15 s)."""
    from ns_plugin.embedded import train_default_model
    model, metrics = train_default_model(digits, progress=False)
    return model, metrics


@pytest.fixture
def model(trained):
    """A fresh copy of the trained model for tests that may modify it."""
    import copy
    return copy.deepcopy(trained[0]).eval()
