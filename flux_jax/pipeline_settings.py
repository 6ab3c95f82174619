"""What a FLUX release fixes beside its weights: the schedule, the T5 prompt length and the default
steps and guidance. dev (guidance-distilled) shifts its schedule with the resolution; schnell not."""

from __future__ import annotations

import dataclasses

from flux_jax.sampling import SchedulerConfig


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """Defaults are FLUX.1-dev's."""

    scheduler: SchedulerConfig = SchedulerConfig()
    max_sequence_length: int = 512
    default_steps: int = 28
    default_guidance: float = 3.5

    @classmethod
    def for_release(cls, scheduler: SchedulerConfig, *, guidance_embed: bool) -> PipelineSettings:
        """dev's settings for a guidance-distilled transformer, schnell's otherwise, with the folder's schedule."""
        if guidance_embed:
            return cls(scheduler=scheduler)
        return cls(scheduler=scheduler, max_sequence_length=256, default_steps=4, default_guidance=0.0)
