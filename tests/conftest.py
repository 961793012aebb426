import numpy as np
import pytest


class ReplayNoise:
    """A noise source that hands out a fixed list of arrays in order (to feed the same noise to two systems)."""

    def __init__(self, arrays):
        self.arrays = list(arrays)
        self.used = 0

    def standard_normal(self, size, dtype=np.float32):
        arr = self.arrays[self.used]
        self.used += 1
        assert tuple(arr.shape) == tuple(size), (arr.shape, size)
        return arr.astype(dtype)


def patch_diffusers_noise(monkeypatch, module, arrays, *more_modules):
    """Makes diffusers modules' randn_tensor (a scheduler's; also the VAE's and a pipeline's) return
    `arrays` in order, from one shared source."""
    import torch

    source = ReplayNoise(arrays)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(source.standard_normal(tuple(shape)))

    for target in (module, *more_modules):
        monkeypatch.setattr(target, "randn_tensor", fake_randn)
    return source


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


_EXPORT_TIERS = ("export", "training")  # tiers that run PyTorch themselves


def pytest_collection_modifyitems(config, items):
    """Tier markers from the folder: `-m "not export"` leaves out the tiers that export or train."""
    for item in items:
        tier = item.path.parent.name
        if tier in _EXPORT_TIERS:
            item.add_marker(pytest.mark.export)
