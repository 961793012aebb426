"""Continuous-time consistency sampler (sCM) on the TrigFlow path, SANA-Sprint's 1-4 step sampler.

Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
https://arxiv.org/abs/2410.11081 (TrigFlow x_t = cos(t) x_0 + sin(t) z, multistep consistency sampling),
as distilled for SANA in Chen et al. 2025, "SANA-Sprint", https://arxiv.org/abs/2503.09641. Matches
diffusers' SCMScheduler given the same noise, and carries SanaSprintPipeline's conversions between TrigFlow
and the flow transformer (scale_model_input, model_timestep, from_velocity, final_latents).

Latents live in sigma_data units (x = sigma_data * latents), as in diffusers' pipeline: init_noise_sigma is
sigma_data, and final_latents divides it out again.
"""

from __future__ import annotations

import numpy as np

from .base import FlowSampler, SchedulerOutput
from .parametrization import flow_to_trigflow, trigflow_to_flow_time, trigflow_x0
from .schedule import FlowScheduleConfig, _linspace_f32

MAX_TIMESTEP = 1.57080  # diffusers' default first angle, ~pi/2 (pure noise)
INTERMEDIATE_TIMESTEP = 1.3  # SANA-Sprint's middle angle for two steps


class SCMSampler(FlowSampler):
    name = "scm"
    stochastic = True  # each step re-noises the x_0 estimate to the next angle
    predictions = ("trigflow",)
    config_defaults = {"prediction_type": "trigflow"}

    def __init__(self, config: FlowScheduleConfig):
        super().__init__(config)
        self.sigma_data = np.float32(config.sigma_data)
        self.schedule_timesteps = np.zeros(0, np.float32)

    @property
    def init_noise_sigma(self) -> float:
        # diffusers' SCMScheduler says 1.0 and its pipeline multiplies by sigma_data itself
        return float(self.config.sigma_data)

    def set_timesteps(
        self,
        num_inference_steps: int,
        timesteps=None,
        max_timesteps: float | None = MAX_TIMESTEP,
        intermediate_timesteps: float | None | str = "auto",
    ) -> None:
        """Angles from `max_timesteps` down to 0. `intermediate_timesteps`: the middle angle of a two-step
        grid; "auto" is SANA-Sprint's 1.3 at two steps and none otherwise (diffusers' 1.3 default makes any
        other step count an error). `timesteps`: num_inference_steps + 1 angles, ending at the last one."""
        steps = self._check_steps(num_inference_steps)
        n_train = self.config.num_train_timesteps
        if steps > n_train:
            raise ValueError(f"num_inference_steps={steps} exceeds num_train_timesteps={n_train}")
        if intermediate_timesteps == "auto":
            intermediate_timesteps = INTERMEDIATE_TIMESTEP if steps == 2 and timesteps is None else None
        if timesteps is not None:
            if len(timesteps) != steps + 1:
                raise ValueError("custom timesteps must hold num_inference_steps + 1 angles")
            if max_timesteps is not None and max_timesteps != MAX_TIMESTEP:
                raise ValueError("pass custom timesteps or max_timesteps, not both")
        elif max_timesteps is None:
            raise ValueError("pass timesteps or max_timesteps")
        if intermediate_timesteps is not None and steps != 2:
            raise ValueError("intermediate_timesteps applies to two steps only")

        if timesteps is not None:
            grid = np.asarray(timesteps, dtype=np.float32)
        elif intermediate_timesteps is not None:
            grid = np.array([max_timesteps, intermediate_timesteps, 0], dtype=np.float32)
        else:
            grid = _linspace_f32(max_timesteps, 0.0, steps + 1)
        # diffusers' `timesteps` hold the final angle too; the pipeline runs the model on all but it
        self.schedule_timesteps = grid
        self.timesteps = grid[:-1].copy()
        self.num_inference_steps = steps
        self.step_index = 0

    def model_timestep(self, timestep) -> np.float32:
        """The flow time s = sin t / (sin t + cos t) that SANA-Sprint's transformer is conditioned on."""
        return trigflow_to_flow_time(timestep)

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """The transformer's input: the TrigFlow point in unit-data scale, projected onto the flow path."""
        s = self.model_timestep(timestep)
        return ((sample / self.sigma_data) * np.sqrt(s**2 + (1 - s) ** 2)).astype(np.float32)

    def from_velocity(self, velocity: np.ndarray, model_input: np.ndarray, timestep) -> np.ndarray:
        """What `step` takes, from the transformer's flow velocity on `model_input` (SanaSprintPipeline's
        conversion): TrigFlow's F, in sigma_data units."""
        return flow_to_trigflow(velocity, model_input, self.model_timestep(timestep)) * self.sigma_data

    def model_prediction(self, output: np.ndarray, model_input: np.ndarray, timestep) -> np.ndarray:
        return self.from_velocity(output, model_input, timestep)

    def final_latents(self, sample: np.ndarray) -> np.ndarray:
        return (sample / self.sigma_data).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """Image-to-image start at angle `timestep`, from unit-scale latents and noise (SanaSprintImg2ImgPipeline)."""
        angle = np.float32(timestep)
        return (np.cos(angle) * (original * self.sigma_data) + np.sin(angle) * (noise * self.sigma_data)).astype(
            np.float32
        )

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        s, t = self.schedule_timesteps[self.step_index], self.schedule_timesteps[self.step_index + 1]
        x0 = trigflow_x0(model_output, sample, s)
        # diffusers draws noise at every step, the last (sin 0 = 0) included; so do we, to stay in step
        z = self._noise(noise, model_output.shape) * self.sigma_data
        prev = np.cos(t) * x0 + np.sin(t) * z
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=x0)
