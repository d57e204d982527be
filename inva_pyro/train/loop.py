"""SVI training: one loop for every InVA-family module.

Each step evaluates Pyro's ``Trace_ELBO`` as a differentiable loss on a minibatch (the model's
subsampled plate scales it to the full training size) and takes an AdamW step, which gives
decoupled weight decay on network weights. The loop adds KL annealing, early stopping on
validation MSE, a checkpoint after every epoch (resumable bit for bit: weights, optimiser, RNG
state and history), and stops with a clear error when the loss is not finite.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from . import distributed
from ..config import TrainingConfig
from ..data.missing import hide_inputs
from ..errors import InputError
from ..model.losses import kl_schedule
from .elbo import DeviceTrace_ELBO
from .graphs import StepGraphs
from .optimizer import clip_and_guard, make_optimizer, poison_gradients, poison_gradients_if

CHECKPOINT = "checkpoint.pt"
# Steps between two looks at the losses on a GPU (each look waits for the device).
FINITE_CHECK_STEPS = 32


class TrainingDiverged(RuntimeError):
    """The ELBO became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Batchable:
    """Standardised training tensors in memory: one (N, V_k) tensor per input, the (N, V_y) outcome, and the
    subjects' conditions (covariates and sites, model/conditions.py) when the model has them.

    The loop needs only ``len``, ``take(idx)``, ``conditions_of(idx)`` and ``device``:
    ``streaming.DiskBatches`` offers the same for cohorts read from disk minibatch by minibatch."""
    inputs: list[torch.Tensor]
    outcome: torch.Tensor
    conditions: object = None

    def __len__(self) -> int:
        return self.outcome.shape[0]

    def take(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [x[idx] for x in self.inputs], self.outcome[idx]

    def conditions_of(self, idx: torch.Tensor):
        return None if self.conditions is None else self.conditions.rows(idx)

    def to(self, device) -> "Batchable":
        return Batchable([x.to(device) for x in self.inputs], self.outcome.to(device),
                         None if self.conditions is None else self.conditions.to(device))

    @property
    def device(self) -> torch.device:
        return self.outcome.device


@dataclass
class TrainingState:
    epoch: int = 0                       # epochs completed
    best_epoch: int = -1
    best_val: float = math.inf
    best_module: dict | None = None
    history: dict = field(default_factory=lambda: {"epoch": [], "train_loss": [], "val_mse": [], "kl_scale": []})
    stopped_early: bool = False
    graph_steps: int = 0                 # steps replayed as CUDA graphs in this process (graphs.py)


def kl_scale_at(epoch: int, cfg: TrainingConfig) -> float:
    """The KL weight of ``epoch`` under the preset's schedule (linear warm-up by default)."""
    return kl_schedule(epoch, cfg.kl_schedule, max_weight=cfg.kl_weight, warmup=cfg.kl_anneal_epochs,
                       total_epochs=cfg.epochs, cycles=cfg.kl_cycles, ratio=cfg.kl_cycle_ratio)


@torch.no_grad()
def predictive_mean(module, xs: list[torch.Tensor], conditions=None) -> torch.Tensor:
    """(B, V) the predictive mean with the output layer at its posterior mean, standardised units."""
    return module.outcome_parts(xs, conditions=conditions).mean(*module.output_layer_mean())


@torch.no_grad()
def validation_mse(module, data: Batchable, batch_size: int = 256) -> float:
    """MSE of the predictive mean (output layer at its posterior mean), standardised units."""
    module.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=data.device), 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)), device=data.device)
        xs, y = data.take(idx)
        total += ((predictive_mean(module, xs, data.conditions_of(idx)) - y) ** 2).sum().double()  # on the device: one synchronisation at the end
        count += y.numel()
    return float(total) / count


def atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(path: Path, module, optimizer, state: TrainingState) -> None:
    atomic_torch_save({
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val": state.best_val,
        "best_module": state.best_module,
        "history": state.history,
        "stopped_early": state.stopped_early,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }, path)


def load_checkpoint(path: Path, module, optimizer) -> TrainingState:
    # weights_only=True: a checkpoint is data, never code.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no checkpoint to resume from") from None
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise InputError(f"{path}: not a valid inva checkpoint (refused to load it: {type(exc).__name__})") from None
    module.load_state_dict(ckpt["module"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return TrainingState(epoch=ckpt["epoch"], best_epoch=ckpt["best_epoch"], best_val=ckpt["best_val"],
                         best_module=ckpt["best_module"], history=ckpt["history"],
                         stopped_early=ckpt["stopped_early"])


def _diverged(what: str, state: TrainingState, ckpt_path: Path | None) -> TrainingDiverged:
    where = f"; the last good checkpoint is {ckpt_path}" if ckpt_path and ckpt_path.exists() else ""
    return TrainingDiverged(f"training stopped: {what} in epoch {state.epoch + 1} (try a lower learning_rate){where}")


def finite_check_steps(device: torch.device) -> int:
    """Steps between two looks at the losses: every step on the CPU, where a look is free."""
    return 1 if device.type == "cpu" else FINITE_CHECK_STEPS


def _check_finite(pending: list, state: TrainingState, ckpt_path: Path | None) -> None:
    """Raise TrainingDiverged at the first (loss, gradient norm) pair that is not finite; one
    host synchronisation for all of ``pending``, which is emptied. It runs before the optimiser
    step of the last pair. A step with a non-finite loss or gradient is never taken: the fused
    AdamW skips it (optimizer.py), and the run stops at the next check, before any checkpoint."""
    if not pending:
        return
    losses, norms = (torch.stack(v) for v in zip(*pending))
    pending.clear()
    ok = torch.isfinite(losses) & torch.isfinite(norms)
    if bool(ok.all()):
        return
    first = int((~ok).nonzero()[0, 0])
    loss, norm = losses[first].item(), norms[first].item()
    what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient became {norm}"
    raise _diverged(what, state, ckpt_path)


def uses_cuda_graphs(cfg: TrainingConfig, data) -> bool:
    """Whether the steps run as CUDA graphs (graphs.py): on CUDA, with the cohort in device memory,
    in one process, unless ``[training] cuda_graphs = false``."""
    return (cfg.cuda_graphs and data.device.type == "cuda" and isinstance(data, Batchable)
            and not distributed.is_distributed())


def train(module, train_data: Batchable, val_data: Batchable, cfg: TrainingConfig, *, seed: int = 0,
          checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
          on_epoch_end: Callable[[TrainingState], None] | None = None) -> TrainingState:
    """Fit ``module`` by SVI; returns the state with the best (early-stopping) weights loaded.

    In a torch.distributed process group each global minibatch is sharded across ranks and
    gradients are averaged (see distributed.py); rank 0 writes the checkpoints.
    """
    rank = distributed.rank()
    optimizer = make_optimizer(module, cfg, train_data.device, capturable=uses_cuda_graphs(cfg, train_data))
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    state = load_checkpoint(ckpt_path, module, optimizer) if resume else TrainingState()
    if rank > 0:  # independent latent and dropout noise on every rank (weights start identical)
        torch.manual_seed(seed + 7919 * rank + 104729 * state.epoch)
    epochs = _Epochs(module, optimizer, train_data, cfg, ckpt_path)
    bar = tqdm(total=cfg.epochs, initial=state.epoch, disable=not progress or rank > 0, desc="fit", unit="epoch")
    while state.epoch < cfg.epochs and not state.stopped_early:
        kl_scale = kl_scale_at(state.epoch, cfg)
        loss = epochs.run(state, kl_scale, seed) / len(train_data)
        val = validation_mse(module, val_data)  # identical on every rank: same weights, eval mode
        state.epoch += 1
        for key, value in (("epoch", state.epoch), ("train_loss", loss), ("val_mse", val), ("kl_scale", kl_scale)):
            state.history[key].append(value)
        if val < state.best_val:
            state.best_val, state.best_epoch = val, state.epoch
            state.best_module = copy.deepcopy(module.state_dict())
        elif state.epoch - state.best_epoch >= cfg.patience:
            state.stopped_early = True
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, module, optimizer, state)
        bar.update(1)
        bar.set_postfix(neg_elbo=f"{loss:.1f}", val_mse=f"{val:.4f}", best=state.best_epoch)
        if on_epoch_end is not None:
            on_epoch_end(state)
    bar.close()
    if state.best_module is not None:
        module.load_state_dict(state.best_module)
    module.eval()
    return state


class _Epochs:
    """The SVI steps of one fit, an epoch at a time: the ELBO, the optimiser, how a step runs (eagerly or
    replayed as a CUDA graph) and when the losses are looked at."""

    def __init__(self, module, optimizer, data, cfg: TrainingConfig, ckpt_path: Path | None):
        self.module, self.optimizer, self.data, self.cfg, self.ckpt_path = module, optimizer, data, cfg, ckpt_path
        self.n = len(data)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Trace_ELBO's value and gradient, without its per-site host synchronisations (elbo.py).
        self.elbo = DeviceTrace_ELBO()
        # Pyro's validation (site shapes, model/guide match, distribution arguments) checks the program,
        # which does not change between steps: the first step of a fit runs it, the others skip its
        # cost (about 7% of a step at the benchmark size). Non-finite values are still caught below.
        self.validate, self.validated = is_validation_enabled(), False
        # Non-finite losses and gradient norms are looked at every ``check_every`` steps (one host
        # synchronisation), and always before a checkpoint is written, so a checkpoint is never written
        # after a bad step. On the CPU checking costs nothing, so it is done every step.
        self.check_every = finite_check_steps(data.device)
        self.prefetch = getattr(data, "prefetch", None)  # streaming.DiskBatches
        self.graphs = StepGraphs(self.step, data.device) if uses_cuda_graphs(cfg, data) else None

    def step(self, idx, kl_scale, rows=None, update=True, prefetch_next=None):
        return svi_step(self.elbo, self.module, self.optimizer, self.params, self.data, idx,
                        idx if rows is None else rows, self.n, kl_scale, self.cfg, update=update,
                        prefetch_next=prefetch_next)

    def run(self, state: TrainingState, kl_scale: float, seed: int) -> float:
        """One pass over the training subjects; their summed loss, over every rank (a host float)."""
        self.module.train()
        batch, device = self.cfg.batch_size, self.data.device
        # The visiting order depends on (seed, epoch) only: identical on every rank and after a resume.
        host_order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed * 100_003 + state.epoch))
        order = host_order.to(device)  # one copy per epoch; minibatch indices are slices of it
        epoch_loss = torch.zeros((), dtype=torch.float64, device=device)  # accumulated on the device
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []            # (loss, gradient norm) not yet checked
        for start in range(0, self.n, batch):
            idx = distributed.shard(order[start:start + batch])
            # Data read from disk is indexed on the host (no device round trip), and the next
            # minibatch is read while this one trains (after this one was taken, in ``step``).
            rows = distributed.shard(host_order[start:start + batch]) if self.prefetch else idx
            loss, grad_norm = self._minibatch(idx, rows, host_order[start + batch:start + 2 * batch], kl_scale)
            if loss is not None:
                epoch_loss += loss.double() * (len(idx) / self.n)
            pending.append((loss.float() if loss is not None else grad_norm.new_zeros(()), grad_norm))
            if len(pending) >= self.check_every:
                _check_finite(pending, state, self.ckpt_path)
            if self.graphs is None:
                self.optimizer.step()
        _check_finite(pending, state, self.ckpt_path)
        state.graph_steps = self.graphs.replays if self.graphs is not None else 0
        return distributed.sum_across_ranks(float(epoch_loss))

    def _minibatch(self, idx, rows, following, kl_scale):
        """(loss, gradient norm) of one minibatch; the update itself waits for the finite check (eager steps)."""
        with pyro.validation_enabled(self.validate and not self.validated):
            if self.graphs is not None:  # loss, backward, clipping and the update in one replay
                result = self.graphs(idx, kl_scale)
            else:
                prefetch_next = ((lambda: self.prefetch(distributed.shard(following)))
                                 if self.prefetch and len(following) else None)
                result = self.step(idx, kl_scale, rows=rows, update=False, prefetch_next=prefetch_next)
        self.validated = self.validated or len(idx) > 0
        return result


def autocast(device: torch.device, enabled: bool):
    """Mixed precision for the networks (see benchmarks/svi_overhead.py --trials autocast).

    bfloat16 on CPU and CUDA alike: it has float32's range, so gradients need no loss scaling
    (float16 would underflow without a GradScaler). No cache of cast weights: a CUDA graph cannot
    record one (graphs.py), and each weight is cast about once per step anyway."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


def svi_step(elbo, module, optimizer, params, data, idx, rows, n, kl_scale, cfg: TrainingConfig, *,
             update: bool = True, prefetch_next=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One SVI step on minibatch ``idx``: (loss, gradient norm) as device tensors (loss None for an
    empty shard). The loss's gradient (all ranks averaged), clipped; then the AdamW update if
    ``update`` (the eager loop updates after its look at non-finite values). Free of host
    synchronisation with Pyro's validation off, so that it can be recorded as a CUDA graph."""
    optimizer.zero_grad(set_to_none=True)
    loss = None
    if len(idx):
        with autocast(data.device, cfg.mixed_precision):
            loss = _minibatch_loss(elbo, module, data, idx, rows, n, kl_scale, cfg)
        if prefetch_next is not None:
            prefetch_next()
        if loss.requires_grad:
            loss.backward()
            poison_gradients_if(params, ~torch.isfinite(loss))  # across ranks only: every rank must skip
        else:  # Pyro refused the parameters (non-finite weights): no graph to differentiate
            poison_gradients(module)
        loss = loss.detach()
    distributed.average_gradients(module)
    # Clipping and the non-finite guard go into the fused AdamW kernel (optimizer.py).
    grad_norm = clip_and_guard(optimizer, params, loss, cfg.grad_clip)
    if update:
        optimizer.step()
    return loss, grad_norm


def _minibatch_loss(elbo, module, data: Batchable, idx, rows, n, kl_scale, cfg: TrainingConfig) -> torch.Tensor:
    xs, y = data.take(rows)
    reconstruct = None
    if cfg.input_dropout > 0:
        xs, reconstruct = (hide_inputs(xs, cfg.input_dropout, scheme=cfg.input_dropout_scheme),
                           xs if cfg.reconstruct_hidden else None)
    try:
        return elbo.differentiable_loss(module.model, module.guide, xs, y, subjects=idx, n_subjects=n,
                                        encoded=module.encode_inputs(xs, data.conditions_of(rows)), kl_scale=kl_scale,
                                        prediction_scale=cfg.prediction_weight, reconstruct=reconstruct)
    except ValueError:
        # Pyro validates distribution parameters, so non-finite weights surface here first.
        if all(torch.isfinite(p).all() for p in module.parameters()):
            raise
        return torch.full((), float("nan"), device=data.device)
