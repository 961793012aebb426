import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True, scope="session")
def _private_graph_cache(tmp_path_factory):
    """Tests keep optimised graphs in their own cache folder, never the user's."""
    import os

    folder = tmp_path_factory.mktemp("graph-cache")
    old = os.environ.get("EDGEDIFF_CACHE_DIR")
    os.environ["EDGEDIFF_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("EDGEDIFF_CACHE_DIR", None)
    else:
        os.environ["EDGEDIFF_CACHE_DIR"] = old


@pytest.fixture(autouse=True, scope="session")
def _auto_stays_on_onnxruntime():
    """The references are fp32 (PyTorch, onnxruntime's CPU provider): `auto` must not move an fp32 bundle to
    OpenVINO's bf16 where the CPU has it and openvino is installed. Its own tests ask for it (test_openvino_runtime)."""
    from edgediff.runtime.providers import AUTO_OV_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(AUTO_OV_ENV, "0")  # in the environment: the benchmarks' worker processes inherit it
        yield


_EXPORT_TIERS = ("export", "training")  # tiers that run PyTorch themselves


def pytest_collection_modifyitems(config, items):
    """Tier markers from the folder: `-m "not export"` leaves out the tiers that export or train."""
    for item in items:
        tier = item.path.parent.name
        if tier in _EXPORT_TIERS:
            item.add_marker(pytest.mark.export)
