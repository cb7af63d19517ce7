"""Suite-wide test setup: fixed seeds, a clean param store and float64 by default.

Mark a test ``pytest.mark.engine_path`` when it is about the engine's own paths (it asserts a
traced graph, the virtual machine or a fused kernel): with the engine off (``VILAB_ENGINE=off``,
``make test-engine-off``) it is skipped with that reason, as there is no such path to test.

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


def pytest_collection_modifyitems(config, items):
    """Skip the tests of the engine's own paths when the engine is off."""
    from vilab.inference.engine.api import engine_off

    if not engine_off():
        return
    skip = pytest.mark.skip(reason="about the engine's own paths (traced, VM or fused); VILAB_ENGINE=off runs eager")
    for item in items:
        if item.get_closest_marker("engine_path"):
            item.add_marker(skip)
