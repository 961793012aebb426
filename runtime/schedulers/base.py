"""What every sampler shares: the output type, the noise source and the registry of names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .schedule import FLOW_PREDICTION_TYPES, FlowScheduleConfig, NoiseSchedule, ScheduleConfig


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
    #: the family of models it drives: "diffusion" (a VP/VE noise schedule; UNets, PixArt) or "flow" (flow
    #: matching: SD3, FLUX, SANA); a pipeline must not pair a sampler with a model of the other kind
    kind: str = "diffusion"
    #: the model prediction types (manifest `prediction_type`) it can drive
    predictions: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    #: the settings it is built from (a bundle's scheduler config is this class's to_dict())
    config_class: type = ScheduleConfig
    #: the diffusers class's defaults where they differ from config_class's (for configs that omit them)
    config_defaults: dict = {}

    def __init__(self, config: ScheduleConfig):
        self.config = config
        self.schedule = NoiseSchedule(config)
        self.timesteps = np.zeros(0)
        self.num_inference_steps = 0
        self.step_index = 0

    @classmethod
    def from_config(cls, config: dict | ScheduleConfig | FlowScheduleConfig) -> "Sampler":
        if isinstance(config, dict):
            return cls(cls.config_class.from_dict({**cls.config_defaults, **config}))
        if not isinstance(config, cls.config_class):
            raise ValueError(f"the {cls.name} sampler takes a {cls.config_class.__name__}, not {type(config).__name__}")
        return cls(config)

    def model_timestep(self, timestep):
        """The timestep the denoiser is conditioned on at `timestep` (a sampler with its own time variable,
        SCM's angle, converts it)."""
        return timestep

    def model_prediction(self, output: np.ndarray, model_input: np.ndarray, timestep) -> np.ndarray:
        """What `step` takes, from the denoiser's output on `model_input` (SCM converts a flow velocity)."""
        return output

    def final_latents(self, sample: np.ndarray) -> np.ndarray:
        """The latents to decode after the last step (SCM works in sigma_data units)."""
        return sample

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


# the flow samplers for each flow prediction type, for error messages (the registry imports this module)
_FLOW_SAMPLERS_FOR = {"flow_prediction": "flow_euler or flow_dpmpp", "trigflow": "scm"}
assert set(_FLOW_SAMPLERS_FOR) == set(FLOW_PREDICTION_TYPES)


class FlowSampler(Sampler):
    """Base for flow-matching samplers: no VP noise schedule; sigmas in [0, 1] from a FlowScheduleConfig."""

    kind = "flow"
    predictions: tuple[str, ...] = ("flow_prediction",)
    config_class = FlowScheduleConfig

    def __init__(self, config: FlowScheduleConfig):
        if config.prediction_type not in self.predictions:
            other = _FLOW_SAMPLERS_FOR.get(config.prediction_type, "a diffusion sampler (euler, ddim, ...)")
            raise ValueError(
                f"the {self.name} sampler drives {' / '.join(self.predictions)} models; this scheduler config's"
                f" prediction_type is {config.prediction_type!r} (use {other})"
            )
        self.config = config
        self.schedule = None  # flow samplers keep their sigmas themselves
        self.timesteps = np.zeros(0)
        self.sigmas = np.zeros(0, np.float32)
        self.num_inference_steps = 0
        self.step_index = 0

    def _check_steps(self, num_inference_steps) -> int:
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        return int(num_inference_steps)

    def _index_of(self, timestep) -> int:
        """The step at `timestep` (its first occurrence), for add_noise: the step a pipeline begins at."""
        hits = np.nonzero(np.isclose(np.asarray(self.timesteps, np.float64), float(timestep), rtol=0, atol=1e-4))[0]
        if len(hits) == 0:
            raise ValueError(f"timestep {timestep} is not one of this sampler's timesteps (call set_timesteps first)")
        return int(hits[0])
