"""Suite-wide test setup: fixed seeds, a clean param store and float64 by default.

Statistical tests run in float64 so Monte Carlo error, not round-off, sets their tolerances.
Mark a module ``pytestmark = pytest.mark.float32`` for network code that should run in float32.
"""

import os

# Spinning OpenMP threads make small networks up to 25x slower on a busy 2-core machine; this must be
# set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib  # noqa: E402
import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")
os.environ.setdefault("VILAB_SMALL", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
POSTERIORDB = os.environ.get("VILAB_POSTERIORDB", os.path.join(SHARED, "posteriordb"))


@pytest.fixture(autouse=True)
def _seeded_float64(request):
    dtype = torch.float32 if request.node.get_closest_marker("float32") else torch.float64
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(previous)
    pyro.clear_param_store()


@pytest.fixture
def posteriordb_path():
    """Path to the posteriordb references (``../shared/posteriordb``); skip when absent."""
    if not os.path.isdir(POSTERIORDB):
        pytest.skip(f"posteriordb references not found at {POSTERIORDB}")
    return POSTERIORDB
