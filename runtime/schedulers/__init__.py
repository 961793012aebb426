"""Samplers in numpy, one algorithm per file, with diffusers' method names.

Two kinds (each class's `kind`): "diffusion" samplers drive models trained on a VP noise schedule (the UNets,
PixArt), "flow" samplers drive flow-matching models (SD3, FLUX, SANA, SANA-Sprint). A sampler's
`predictions` are the model prediction types it can drive; `check_sampler_fits` refuses any other pairing.
"""

from .base import FlowSampler, Sampler, SchedulerOutput
from .ddim import DDIMSampler
from .dpmsolver import DPMSolverSampler
from .euler import EulerSampler
from .euler_ancestral import EulerAncestralSampler
from .flow_dpmsolver import FlowDPMSolverSampler
from .flow_euler import FlowEulerSampler
from .lcm import LCMSampler
from .schedule import FlowScheduleConfig, NoiseSchedule, ScheduleConfig, calculate_shift
from .scm import SCMSampler
from .tcd import TCDSampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        EulerSampler,
        EulerAncestralSampler,
        DDIMSampler,
        LCMSampler,
        TCDSampler,
        DPMSolverSampler,
        FlowEulerSampler,
        FlowDPMSolverSampler,
        SCMSampler,
    )
}

# diffusers scheduler class -> our sampler, to carry a source model's own choice into its bundle. Only classes
# that name one sampler whatever their config: DPMSolverMultistepScheduler drives VP models (PixArt-Sigma, SD:
# dpmpp) as well as SANA's flow (flow_dpmpp), so it is resolved from its config by sampler_for_scheduler.
DIFFUSERS_CLASS_TO_SAMPLER = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DDIMScheduler": "ddim",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "SCMScheduler": "scm",
}
# and back: the diffusers class for a bundle's sampler (export resolves its config; benchmarks compare with it)
SAMPLER_TO_DIFFUSERS_CLASS = {
    **{v: k for k, v in DIFFUSERS_CLASS_TO_SAMPLER.items()},
    "flow_dpmpp": "DPMSolverMultistepScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
}


def sampler_for_scheduler(class_name: str, config: dict) -> str | None:
    """Our sampler for a diffusers scheduler of `class_name` with `config`, or None when there is none."""
    if class_name == "DPMSolverMultistepScheduler":
        flow = config.get("use_flow_sigmas") and config.get("prediction_type") == "flow_prediction"
        if flow:
            return "flow_dpmpp"
        # the VP form; diffusers' noise-prediction variants (dpmsolver, sde-dpmsolver) have no sampler here
        return "dpmpp" if config.get("algorithm_type", "dpmsolver++") in ("dpmsolver++", "sde-dpmsolver++") else None
    return DIFFUSERS_CLASS_TO_SAMPLER.get(class_name)


def check_sampler_fits(name: str, prediction_type: str) -> None:
    """Raises ValueError unless sampler `name` can drive a model whose prediction type is `prediction_type`
    (a bundle manifest's): a flow sampler on a UNet, or a diffusion sampler on a flow transformer, is refused."""
    cls = _sampler_class(name)
    if prediction_type not in cls.predictions:
        fitting = [n for n, c in SAMPLERS.items() if prediction_type in c.predictions]
        raise ValueError(
            f"sampler {name!r} ({cls.kind}) cannot drive a model that predicts {prediction_type!r};"
            f" samplers for it: {', '.join(fitting) or 'none'}"
        )


def make_sampler(
    name: str, config: dict | ScheduleConfig | FlowScheduleConfig, prediction_type: str | None = None
) -> Sampler:
    """Sampler `name` from a scheduler config; with `prediction_type` (the model's), checks that they fit."""
    cls = _sampler_class(name)
    if prediction_type is not None:
        check_sampler_fits(name, prediction_type)
    return cls.from_config(config)


def _sampler_class(name: str) -> type[Sampler]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}") from None


__all__ = [
    "SAMPLERS",
    "DIFFUSERS_CLASS_TO_SAMPLER",
    "SAMPLER_TO_DIFFUSERS_CLASS",
    "Sampler",
    "FlowSampler",
    "SchedulerOutput",
    "NoiseSchedule",
    "ScheduleConfig",
    "FlowScheduleConfig",
    "calculate_shift",
    "check_sampler_fits",
    "make_sampler",
    "sampler_for_scheduler",
    "DDIMSampler",
    "EulerSampler",
    "EulerAncestralSampler",
    "LCMSampler",
    "TCDSampler",
    "DPMSolverSampler",
    "FlowEulerSampler",
    "FlowDPMSolverSampler",
    "SCMSampler",
]
