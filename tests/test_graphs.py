"""The training step can be recorded as a CUDA graph: checked without a GPU.

A CUDA graph records kernels; it cannot record a copy of a host tensor to the device ("Cannot copy
between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is pinned", the error a
CUDA fit once met) nor a synchronisation with the host (``.item()``, ``bool(tensor)``, ``nonzero``:
"operation not permitted when stream is capturing"). Both are found here on the ``meta`` device:

- ``HostTensors`` (a torch-function mode) sees every ``torch.tensor`` / ``torch.as_tensor`` that
  builds a device tensor from host data, and every copy of a CPU tensor to the device;
- ``Syncs`` (a dispatch mode) sees every operation that reads a device value on the host, and every
  operation on device tensors handed a host tensor (an index tensor kept on the CPU: checked with the
  spatial smoothing prior's neighbour table made a plain attribute instead of a buffer, it fails).

Checked against the code before this change: with ``dist.Normal(zeros, 1.0)`` for the latent priors
(module.py) and ``torch.as_tensor(prior_scale, device=...)`` (experts.py), the first test fails: torch's
``broadcast_all`` turns the 1.0 into ``torch.tensor(1.0, device=...)``, a host copy at every step.
"""
from __future__ import annotations

import traceback

import pyro
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from inva_pyro.model.module import InVAModule
from inva_pyro.train.elbo import DeviceTrace_ELBO
from inva_pyro.train.loop import Batchable, svi_step, uses_cuda_graphs
from inva_pyro.train.optimizer import make_optimizer

META = torch.device("meta")
aten = torch.ops.aten
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._is_all_true.default,
         aten.is_nonzero.default, aten.masked_select.default}


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "inva_pyro" in f.filename or "tests" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class HostTensors(TorchFunctionMode):
    """Records device tensors built from host data."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type != "cpu":
            source = args[0] if args else kwargs.get("data")
            if not (isinstance(source, torch.Tensor) and source.device.type != "cpu"):
                self.found.append(f"{func.__name__} at {_where()}")
        if func in (torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cuda) and args:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors) and (
                    any(t.device.type != "cpu" for t in tensors) or "meta" in str(args[1:]) + str(kwargs)):
                self.found.append(f"{func.__name__} from the host at {_where()}")
        return func(*args, **kwargs)


class Syncs(TorchDispatchMode):
    """Records host reads of device values; returns a placeholder so the code runs on (meta has no data)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # an operation on device tensors given a host tensor (an index, say) copies it at every step
        flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
                if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in flat) and any(t.device.type == "cpu" and t.dim() > 0 for t in flat):
            self.found.append(f"{func} given a host tensor at {_where()}")
        if func in SYNCS and any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            self.found.append(f"{func} at {_where()}")
            if func is aten._local_scalar_dense.default:
                return True if args[0].dtype == torch.bool else 0
        return func(*args, **kwargs)


def _module(make_preset, model):
    cfg = make_preset(model=model).model
    pairs = [[v, v + 1] for v in range(19)] if cfg.spatial_smoothing > 0 else None  # a line graph
    return InVAModule(["x1", "x2", "x3"], [20, 12, 20], 20, cfg, neighbour_pairs=pairs)


STRUCTURES = [None, {"structure": "separate"}, {"structure": "concatenated", "predictor": "paper"},
              {"structure": "joint"}, {"mmd_weight": 1.0, "bayesian_output": False},
              {"structure": "joint", "spatial_smoothing": 10.0}]


def _two_steps_on_meta(make_preset, model, capturable=False):
    """Two training steps (the update included) on the meta device: (optimiser, host copies, syncs)."""
    preset = make_preset(model=model, training={"input_dropout": 0.3} if model == {"structure": "joint"} else {})
    module = _module(make_preset, model).to(META)
    g = torch.Generator().manual_seed(0)
    data = Batchable([torch.randn(10, v, generator=g).to(META) for v in (20, 12, 20)],
                     torch.randn(10, 20, generator=g).to(META))
    params = list(module.parameters())
    optimizer = make_optimizer(module, preset.training, META, capturable=capturable)
    elbo, idx = DeviceTrace_ELBO(), torch.arange(4, device=META)
    kl_weight = torch.full((), 0.5, device=META)  # as the graphs pass it
    with pyro.validation_enabled(False):
        host, syncs = HostTensors(), Syncs()
        with syncs, host:
            for _ in range(2):  # the second step runs with the optimiser's state built
                loss, grad_norm = svi_step(elbo, module, optimizer, params, data, idx, idx, len(data), kl_weight,
                                           preset.training)
    assert loss.device == META and grad_norm.device == META
    return optimizer, host, syncs


@pytest.mark.parametrize("model", STRUCTURES)
def test_the_training_step_copies_nothing_from_the_host_and_never_syncs(make_preset, model):
    _, host, syncs = _two_steps_on_meta(make_preset, model)
    assert host.found == [], f"host tensors copied to the device: {host.found}"
    assert syncs.found == [], f"host synchronisations or host tensors in device work: {syncs.found}"


def test_the_fused_update_copies_nothing_from_the_host_and_never_syncs(make_preset, monkeypatch):
    """On CPU and CUDA, AdamW is fused and takes the clipping and the non-finite guard into its kernel
    (train/optimizer.py); its meta kernel runs here once meta is let into torch's fused devices."""
    import torch.optim.optimizer as torch_optimizer

    from inva_pyro.train import optimizer as inva_optimizer
    monkeypatch.setattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cpu", "cuda", "meta"])
    monkeypatch.setattr(inva_optimizer, "FUSED_DEVICES", ("cpu", "cuda", "meta"))
    optimizer, host, syncs = _two_steps_on_meta(make_preset, None, capturable=True)  # as graphs.py
    assert inva_optimizer.is_fused(optimizer) and optimizer.found_inf.device == META
    assert host.found == [], f"host tensors copied to the device: {host.found}"
    assert syncs.found == [], f"host synchronisations or host tensors in device work: {syncs.found}"


def test_the_checks_see_a_host_tensor_and_a_sync():
    """The two modes are not vacuous: each finds what it is there to find."""
    x = torch.zeros(3, device=META)
    with pyro.validation_enabled(False):
        host, syncs = HostTensors(), Syncs()
        with syncs, host:
            torch.distributions.Normal(x, 1.0, validate_args=False)  # broadcast_all: torch.tensor(1.0, device=meta)
            torch.ones(3).to(META)
            bool((x > 0).all())
            x[torch.tensor([0, 2])]  # a host index into device work: the copy happens inside the kernel call
    assert len(host.found) == 2 and "tensor" in host.found[0] and "to from the host" in host.found[1]
    assert len(syncs.found) == 2 and "given a host tensor" in syncs.found[1]


def test_graphs_are_used_only_on_cuda_with_the_cohort_in_memory(make_preset):
    cfg = make_preset().training
    on_cpu = Batchable([torch.zeros(2, 3)], torch.zeros(2, 3))
    assert not uses_cuda_graphs(cfg, on_cpu)
    assert not uses_cuda_graphs(make_preset(training={"cuda_graphs": False}).training, on_cpu)
