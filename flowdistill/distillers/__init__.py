"""Distillers: one file per method, registered by name (DESIGN.md §3)."""

from flowdistill.distillers import (
    flow_matching,  # noqa: F401  (registers)
    freeflow,  # noqa: F401  (registers)
    mdt,  # noqa: F401  (registers)
    rectok,  # noqa: F401  (registers)
    reflow,  # noqa: F401  (registers "reflow" and "instaflow")
    streamdit,  # noqa: F401  (registers "streamdit")
    streamdit_distill,  # noqa: F401  (registers "streamdit_distill")
    tscd,  # noqa: F401  (registers "tscd", "lcm" and "pcm")
)
from flowdistill.distillers.base import (
    DISTILLERS,
    Distiller,
    DistillerConfig,
    OptimGroup,
    build_distiller,
    register_distiller,
)

__all__ = ["DISTILLERS", "Distiller", "DistillerConfig", "OptimGroup", "build_distiller",
           "register_distiller"]
