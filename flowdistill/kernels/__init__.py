"""Fused elementwise ops for the sampling and training hot paths.

The public functions here dispatch to Triton kernels on CUDA tensors (when Triton imports) and to
the torch reference in :mod:`flowdistill.kernels.reference` otherwise. ``FLOWDISTILL_KERNELS``
(``auto`` | ``torch`` | ``triton``) overrides the choice; see :mod:`flowdistill.kernels.dispatch`.
:class:`GraphedSampler` / :func:`capture_sampler` replay fixed-shape few-step samplers as CUDA
graphs (eager elsewhere). Importing this package does not import Triton.
"""

from flowdistill.kernels.dispatch import (
    affine_sample_and_target,
    backend,
    cfg_combine,
    ema_update_,
    euler_step,
    flow_map_jump,
    guided_euler_step,
    lincomb,
    linear_sample_and_target,
    resolve,
)
from flowdistill.kernels.graphs import GraphedSampler, capture_sampler

__all__ = [
    "GraphedSampler",
    "affine_sample_and_target",
    "backend",
    "capture_sampler",
    "cfg_combine",
    "ema_update_",
    "euler_step",
    "flow_map_jump",
    "guided_euler_step",
    "lincomb",
    "linear_sample_and_target",
    "resolve",
]
