"""Pyro's ``Trace_ELBO`` without host synchronisation.

``Trace_ELBO.differentiable_loss`` turns the log-density of every sample site into a Python
number (``torch_item``, one ``.item()`` per site: about 20 per step for three inputs) and checks
the loss for NaN (``warn_if_nan``: a ``bool`` on the device and a backward hook that does the same
for the gradient). On the CPU these cost little; on a GPU each one stops the host until the device
has caught up, so the step runs at the pace of kernel launches plus round trips, whatever its size.

``DeviceTrace_ELBO`` returns the same value and the same gradient as a tensor that stays on the
device: value = -(sum of the model's log-densities - sum of the guide's), gradient = that of Pyro's
surrogate. Non-finite values are left to the training loop, which checks them without a per-step
synchronisation (``loop.py``). A guide with non-reparameterised sites falls back to Pyro's own
particle computation (score-function terms need ``log_r``), which then synchronises as before.
"""
from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_identically_zero


class DeviceTrace_ELBO(Trace_ELBO):  # noqa: N801 (Pyro's naming)
    def _particle(self, model_trace, guide_trace):
        elbo = surrogate = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
        surrogate = elbo
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                if not is_identically_zero(score_function_term):
                    loss, surrogate_loss = Trace_ELBO._differentiable_loss_particle(self, model_trace, guide_trace)
                    return -torch.as_tensor(loss), -surrogate_loss
                elbo = elbo - site["log_prob_sum"]
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()
        return elbo, surrogate

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbo = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            particle_elbo, particle_surrogate = self._particle(model_trace, guide_trace)
            elbo = elbo + particle_elbo / self.num_particles
            surrogate = surrogate + particle_surrogate / self.num_particles
        elbo, surrogate = torch.as_tensor(elbo), torch.as_tensor(surrogate)
        # value of -elbo, gradient of -surrogate (as Pyro's ``loss + (surrogate - item(surrogate))``)
        return -(elbo.detach().to(surrogate.device) + (surrogate - surrogate.detach()))
