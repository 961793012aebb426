"""What every sampler shares: the output type, the noise source and the registry of names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .schedule import NoiseSchedule, ScheduleConfig


class NoiseSource(Protocol):
    """Anything with numpy Generator's `standard_normal(size, dtype)`; tests pass one that replays fixed noise."""

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray: ...


@dataclass
class SchedulerOutput:
    prev_sample: np.ndarray  # the latents to feed the next denoiser call
    denoised: np.ndarray | None = None  # the current estimate of the clean latents (for previews and LCM's output)


class Sampler:
    """Base for samplers with diffusers' method names: set_timesteps, scale_model_input, step."""

    name: str = ""
    #: whether `step` draws fresh noise (ancestral / consistency samplers)
    stochastic: bool = False

    def __init__(self, config: ScheduleConfig):
        self.config = config
        self.schedule = NoiseSchedule(config)
        self.timesteps = np.zeros(0)
        self.num_inference_steps = 0
        self.step_index = 0

    @classmethod
    def from_config(cls, config: dict | ScheduleConfig) -> "Sampler":
        return cls(config if isinstance(config, ScheduleConfig) else ScheduleConfig.from_dict(config))

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = int(num_inference_steps)
        self.step_index = 0
        self.timesteps = self._timesteps(self.num_inference_steps)

    def _timesteps(self, num_inference_steps: int) -> np.ndarray:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        return sample

    def begin(self, index: int) -> None:
        """Start at step `index` of the set timesteps (image-to-image skips the noisiest ones), as
        diffusers' set_begin_index."""
        self.step_index = int(index)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """The forward process at `timestep`: sqrt(a_t) x0 + sqrt(1 - a_t) noise (VP samplers)."""
        a = np.float32(self.schedule.alpha(int(timestep)))
        return (np.sqrt(a) * original + np.sqrt(np.float32(1) - a) * noise).astype(np.float32)

    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> SchedulerOutput:
        """Advances one step; `noise` is required when `stochastic` (the pipeline passes its seeded generator)."""
        out = self._step(model_output.astype(np.float32), timestep, sample.astype(np.float32), noise)
        self.step_index += 1
        return out

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        raise NotImplementedError

    def _noise(self, noise: NoiseSource | None, shape) -> np.ndarray:
        if noise is None:
            raise ValueError(f"the {self.name} sampler is stochastic: pass a noise source (a numpy Generator)")
        return np.asarray(noise.standard_normal(shape, dtype=np.float32), dtype=np.float32)
