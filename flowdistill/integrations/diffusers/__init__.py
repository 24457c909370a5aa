"""diffusers integration: teacher adapters, the drop-in scheduler, the pipeline, export and LoRA.

- :mod:`.adapters` — diffusers models (SD3, Flux, DDPM UNets) as VelocityFields in our convention
  (``t`` = noise level of the linear path), registered in ``TEACHER_ADAPTERS``.
- :mod:`.conditions` — ``TextCondition`` (prompt embeddings) and ``TextCFGField`` (text CFG).
- :mod:`.scheduler` — ``FlowDistillScheduler``: ``x + (s − t)·u`` steps for flow-map or velocity
  students inside diffusers pipelines.
- :mod:`.pipeline` — ``FlowDistillPipeline`` for our own students (``student`` + ``scheduler``).
- :mod:`.export` — ``export_run`` (``flowdistill export RUN_DIR OUT_DIR``).
- :mod:`.lora` — LoRA students via peft, saved in ``load_lora_weights`` format.
- :mod:`.segment_student` — one-time (e.g. LoRA) TSCD students read as jumps to their segment's edge.
"""

from flowdistill.integrations.diffusers.adapters import (
    TEACHER_ADAPTERS,
    DDPMUNetAdapter,
    FluxAdapter,
    SD3Adapter,
    TextCFGField,
    TextCondition,
    adapt_teacher,
    adapter_name_for,
    calculate_shift,
    pack_latents,
    scheduler_sigmas,
    unpack_latents,
)
from flowdistill.integrations.diffusers.export import build_pipeline, export_run
from flowdistill.integrations.diffusers.pipeline import FlowDistillPipeline
from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler
from flowdistill.integrations.diffusers.segment_student import (
    OneTimeSegmentStudent,
    one_time_scheduler_config,
    one_time_student,
)

__all__ = [
    "TEACHER_ADAPTERS",
    "DDPMUNetAdapter",
    "FlowDistillPipeline",
    "FlowDistillScheduler",
    "FluxAdapter",
    "OneTimeSegmentStudent",
    "SD3Adapter",
    "TextCFGField",
    "TextCondition",
    "adapt_teacher",
    "adapter_name_for",
    "build_pipeline",
    "calculate_shift",
    "export_run",
    "one_time_scheduler_config",
    "one_time_student",
    "pack_latents",
    "scheduler_sigmas",
    "unpack_latents",
]
