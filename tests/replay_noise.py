"""Noise replayed from fixed arrays, so that diffusers and the runtime draw the same noise in parity tests."""

import numpy as np


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
