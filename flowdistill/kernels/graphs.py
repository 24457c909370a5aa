"""CUDA-graph capture of fixed-shape few-step sampling callables.

A few-step sampler (one to four network calls plus the fused jumps) on a small batch is bound by
kernel-launch latency rather than by the GPU; replaying a captured ``torch.cuda.CUDAGraph`` issues
the whole sequence in one launch. :class:`GraphedSampler` wraps a callable such as
``lambda noise: sample_k_jumps(student, noise)``:

- on the first call (or :meth:`GraphedSampler.capture`) with CUDA tensors it warms the callable up
  on a side stream (cuBLAS handles, Triton compilation and autotuning happen there), captures one
  call into a graph and keeps static copies of the inputs;
- later calls whose inputs have the captured signature (shapes, dtypes, devices, and equal
  non-tensor arguments) copy the inputs into the static buffers and replay the graph;
- anything else runs the callable eagerly: CPU inputs, another shape, no CUDA, or a capture that
  failed (a warning says why). The eager output is what a replay would give.

Constraints of the captured callable (those of CUDA graphs): static shapes; no host
synchronisation inside (no ``.item()``, ``.cpu()``, ``print`` of tensor values, data-dependent
Python control flow, or host-to-device copies of new Python data such as
``torch.tensor([...], device="cuda")`` — build time grids before capturing, outside the callable);
all tensors it reads other than its arguments (weights, precomputed grids) must stay at the same
addresses; random numbers must come from the default CUDA generator (supported by graph capture).
Outputs of a replay live in static buffers that the next replay overwrites, so they are cloned
unless ``clone_outputs=False``. Calls run under ``torch.no_grad()`` unless ``no_grad=False``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor


def _signature(args: Sequence[Any]) -> tuple:
    """Hashable description of the inputs: tensor metadata, or the value of other arguments."""
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else ("value", a)
                 for a in args)


class GraphedSampler:
    """Replay a captured CUDA graph of ``fn(*inputs)`` for inputs of the captured signature.

    ``fn`` takes positional arguments (tensors, or constants that must match at replay) and
    returns a tensor or a pytree (tuple/list/dict) of tensors. ``warmup`` eager calls precede the
    capture. ``capture_on_first_call`` captures lazily on the first CUDA call. Attributes:
    ``graphed`` (a graph is held), ``failure`` (why capture failed, else ``None``), ``replays`` and
    ``eager_calls`` (counters).
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 3, clone_outputs: bool = True,
                 no_grad: bool = True, capture_on_first_call: bool = True):
        self.fn = fn
        self.warmup = int(warmup)
        self.clone_outputs = clone_outputs
        self.no_grad = no_grad
        self.capture_on_first_call = capture_on_first_call
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None
        self.replays = 0
        self.eager_calls = 0
        self._sig: tuple | None = None
        self._static_in: list[Tensor | None] = []
        self._static_out: list[Any] = []
        self._out_spec = None
        self._tried = False

    @property
    def graphed(self) -> bool:
        """Whether a captured graph is held."""
        return self.graph is not None

    def _grad_ctx(self):
        return torch.no_grad() if self.no_grad else torch.enable_grad()

    @staticmethod
    def _capturable(args: Sequence[Any]) -> bool:
        tensors = [a for a in args if isinstance(a, Tensor)]
        return (torch.cuda.is_available() and bool(tensors)
                and all(a.is_cuda for a in tensors))

    def reset(self) -> None:
        """Drop the captured graph and its buffers (the next CUDA call may capture again)."""
        self.graph, self._sig, self._out_spec = None, None, None
        self._static_in, self._static_out = [], []
        self.failure, self._tried = None, False

    def capture(self, *example_inputs: Any) -> bool:
        """Warm up and capture ``fn(*example_inputs)``; ``True`` if a graph was captured.

        Returns ``False`` (and keeps the eager path) for non-CUDA inputs or when the capture fails.
        """
        self.reset()
        self._tried = True
        if not self._capturable(example_inputs):
            return False
        static = [a.detach().clone() if isinstance(a, Tensor) else a for a in example_inputs]
        try:
            with self._grad_ctx():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self.fn(*static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = self.fn(*static)
            leaves, spec = pytree.tree_flatten(out)
        except Exception as e:  # capture is an optimisation: fall back to eager on any failure
            self.failure = f"{type(e).__name__}: {e}"
            warnings.warn(f"GraphedSampler: CUDA graph capture failed, running eagerly ({self.failure})",
                          RuntimeWarning, stacklevel=2)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            return False
        self.graph, self._sig = graph, _signature(example_inputs)
        self._static_in = [a if isinstance(a, Tensor) else None for a in static]
        self._static_out, self._out_spec = leaves, spec
        return True

    def __call__(self, *inputs: Any) -> Any:
        """``fn(*inputs)``: a graph replay when the signature matches the captured one, else eager."""
        if self.graph is None and not self._tried and self.capture_on_first_call:
            self.capture(*inputs)
        if self.graph is not None and _signature(inputs) == self._sig:
            for dst, src in zip(self._static_in, inputs, strict=True):
                if dst is not None and dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            self.graph.replay()
            self.replays += 1
            outs = [o.clone() if self.clone_outputs and isinstance(o, Tensor) else o
                    for o in self._static_out]
            return pytree.tree_unflatten(outs, self._out_spec)
        self.eager_calls += 1
        with self._grad_ctx():
            return self.fn(*inputs)


def capture_sampler(fn: Callable[..., Any], example_inputs: Sequence[Any], **kw: Any) -> GraphedSampler:
    """A :class:`GraphedSampler` for ``fn``, captured now on ``example_inputs`` (CUDA only).

    On CPU, or if the capture fails, the returned object runs ``fn`` eagerly.
    """
    g = GraphedSampler(fn, **kw)
    g.capture(*example_inputs)
    return g
