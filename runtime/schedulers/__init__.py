"""Samplers in numpy, one algorithm per file, with diffusers' method names."""

from .base import Sampler, SchedulerOutput
from .ddim import DDIMSampler
from .euler import EulerSampler
from .euler_ancestral import EulerAncestralSampler
from .lcm import LCMSampler
from .schedule import NoiseSchedule, ScheduleConfig
from .tcd import TCDSampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (EulerSampler, EulerAncestralSampler, DDIMSampler, LCMSampler, TCDSampler)
}

# diffusers scheduler class -> our sampler, to carry a source model's own choice into its bundle.
DIFFUSERS_CLASS_TO_SAMPLER = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DDIMScheduler": "ddim",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}
# and back: the diffusers class for a bundle's sampler (export resolves its config; benchmarks compare with it)
SAMPLER_TO_DIFFUSERS_CLASS = {v: k for k, v in DIFFUSERS_CLASS_TO_SAMPLER.items()}


def make_sampler(name: str, config: dict | ScheduleConfig) -> Sampler:
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}") from None
    return cls.from_config(config)


__all__ = [
    "SAMPLERS",
    "DIFFUSERS_CLASS_TO_SAMPLER",
    "SAMPLER_TO_DIFFUSERS_CLASS",
    "Sampler",
    "SchedulerOutput",
    "NoiseSchedule",
    "ScheduleConfig",
    "make_sampler",
    "DDIMSampler",
    "EulerSampler",
    "EulerAncestralSampler",
    "LCMSampler",
    "TCDSampler",
]
