"""The SVI step as a CUDA graph: one launch per minibatch instead of about 1,400.

A step of the InVA program (ELBO through Pyro's traces, backward, clipping, AdamW) runs about
1,400 small kernels. On a GPU each costs more to launch from Python than to run, so an eager step
takes about the same 25-35 ms at 1,000 features as at 230,000 (docs/performance.md). A CUDA graph
records the kernels of one step once and replays them with a single launch; Python (and Pyro's
effect handlers) run only while recording.

What a replay may not change is its shapes and the addresses it reads, so everything that varies
between steps lives in static device tensors that the graph reads:

- the minibatch's subject indices (copied in before each replay); the graph gathers the inputs and
  the outcome from the cohort, which stays in device memory (``loop.Batchable``);
- the KL weight (filled in when the schedule changes it; ``module.weighted`` scales by a tensor);
- the random draws of the latents, dropout and input dropout are fresh at every replay: PyTorch's
  CUDA generator advances its offset per replay, and seeded fits stay reproducible.

One graph is recorded per minibatch size (a cohort whose size is not a multiple of the batch size
has a smaller last minibatch, with its own subsampling scale N/B). A size is recorded after it has
run eagerly once on a side stream, so that lazily built state (the optimiser's moments, cuBLAS
workspaces) exists before recording, as PyTorch's recipe asks. The optimiser must be built with
``capturable=True``. Non-finite losses and gradient norms come back as device tensors and are
checked by the loop as in eager training (every ``FINITE_CHECK_STEPS`` steps and before a checkpoint).

If recording fails (a network that synchronises with the host, say), training goes on eagerly after
one warning; nothing of the failed recording is replayed.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

StepFn = Callable[[torch.Tensor, "float | torch.Tensor"], tuple[torch.Tensor, torch.Tensor]]


class StepGraphs:
    """Runs ``step(indices, kl_weight) -> (loss, gradient norm)`` (the optimiser update included) as
    CUDA graphs, one per minibatch size, after one eager run of that size.

    ``step`` must be free of host synchronisation and of host-to-device copies once Pyro's
    validation is off (tests/test_graphs.py checks the training step for both on the meta device)."""

    def __init__(self, step: StepFn, device: torch.device):
        self.step = step
        self.device = device
        self.kl_weight = torch.zeros((), device=device)
        self._kl_value: float | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._warm: set[int] = set()
        self._side = torch.cuda.Stream(device)
        self.enabled = True
        self.replays = 0

    def __call__(self, idx: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        if kl_weight != self._kl_value:  # one small fill per epoch, outside the graphs
            self.kl_weight.fill_(kl_weight)
            self._kl_value = kl_weight
        size = len(idx)
        if not self.enabled:
            return self.step(idx, kl_weight)
        if size not in self._warm:
            self._warm.add(size)
            return self._on_side_stream(idx, kl_weight)
        if size not in self._graphs:
            self._record(size, idx)
            if not self.enabled:
                return self.step(idx, kl_weight)
        graph, static_idx, (loss, grad_norm) = self._graphs[size]
        static_idx.copy_(idx)
        graph.replay()
        self.replays += 1
        # Copies: the next replay overwrites the graph's outputs, the loop keeps these for its checks.
        return loss.clone(), grad_norm.clone()

    def _on_side_stream(self, idx, kl_weight: float):
        # An ordinary eager step (the KL weight as a number, as without graphs), on a side stream.
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            out = self.step(idx, kl_weight)
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        return out

    def _record(self, size: int, idx: torch.Tensor) -> None:
        static_idx = idx.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph):
                outputs = self.step(static_idx, self.kl_weight)
        except Exception as exc:  # recording only: the step has not run, no weight has changed
            self.enabled = False
            self._graphs.clear()
            first_line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warnings.warn(f"CUDA graph recording of the training step failed ({first_line}); training goes on "
                          "without graphs (set [training] cuda_graphs = false to skip the attempt)", stacklevel=3)
            return
        self._graphs[size] = (graph, static_idx, outputs)
