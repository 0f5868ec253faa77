"""The learner's update rules, each owning its traces, step, reset and state dict:
ObGDRule (two ObGD optimisers) and AdamLambda (Adam along delta times a trace).

ObGD: overshooting-bounded gradient descent with eligibility traces (stream-x).

The step size shrinks whenever one update could move the prediction by more than the TD
error itself: alpha_eff = alpha / max(1, alpha * kappa * max(|delta|, 1) * ||z||_1).
Gradients are passed in (not read from .grad), so two instances can own separate traces
over shared parameters (the shared-conv network's trunk feeds both policy and value).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agent.errors import NonFiniteError

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.networks import ActorCritic, WeightCopy


class ObGD:
    """theta <- theta - alpha_eff * delta * z with z <- gamma * lambda * z + grad.

    `grad` is the gradient of -V or of -log pi (the objective whose increase is wanted),
    so a positive delta moves the prediction up. The parameters are one flat tensor (see
    ActorCritic.flat) so that the trace arithmetic is a handful of ops per step.
    """

    def __init__(self, flat_params: torch.Tensor, *, lr: float, gamma: float,
                 lambda_: float, kappa: float) -> None:
        self.flat_params = flat_params
        self.lr = lr
        self.decay = gamma * lambda_
        self.kappa = kappa
        self.trace = torch.zeros_like(flat_params)
        self._next_trace = torch.zeros_like(flat_params)  # built aside until commit

    @torch.no_grad()
    def step(self, delta: float, grad: torch.Tensor, reset: bool) -> float:
        """Apply one update from the flat gradient; returns the effective step size.
        `reset` clears the trace after the update (episode end)."""
        step_size = self.prepare(delta, grad)
        self.commit(delta, step_size, reset)
        return step_size

    @torch.no_grad()
    def prepare(self, delta: float, grad: torch.Tensor) -> float:
        """Build the next trace aside and return the step size it allows; raises
        NonFiniteError with the trace and the parameters untouched. Two optimisers over a
        shared trunk both prepare before either commits, so neither steps when one refuses."""
        next_trace = self._next_trace
        if self.decay == 0.0:
            # lambda = 0: the trace is exactly this step's gradient (pure one-step update).
            next_trace.copy_(grad)
        else:
            torch.mul(self.trace, self.decay, out=next_trace).add_(grad)
        trace_l1 = float(next_trace.abs().sum())  # 5x faster than vector_norm(ord=1) here
        if not math.isfinite(trace_l1):
            raise NonFiniteError("eligibility trace is not finite")
        bound = self.lr * self.kappa * max(abs(delta), 1.0) * trace_l1
        return self.lr / bound if bound > 1.0 else self.lr

    @torch.no_grad()
    def commit(self, delta: float, step_size: float, reset: bool) -> None:
        """Adopt the prepared trace and step along it."""
        self.trace, self._next_trace = self._next_trace, self.trace
        self.flat_params.add_(self.trace, alpha=-step_size * delta)
        if reset:
            self.trace.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"trace": self.trace.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        trace = state["trace"]
        if trace.shape != self.trace.shape:
            raise ValueError(f"ObGD trace has {trace.numel()} elements, the network "
                             f"{self.trace.numel()}")
        self.trace.copy_(trace)


class ObGDRule:
    """The learner's ObGD update: one ObGD (its own trace) for the policy parameters and
    one for the value parameters, over the same network."""

    def __init__(self, net: ActorCritic, config: AgentConfig, network: str) -> None:
        self.net = net
        common = {"lr": config.lr, "gamma": config.gamma, "lambda_": config.lambda_}
        kappa_policy, kappa_value = config.kappas(network)
        self.policy = ObGD(net.policy_flat, kappa=kappa_policy, **common)
        self.value = ObGD(net.value_flat, kappa=kappa_value, **common)
        self._policy_params = net.policy_parameters()
        self._value_params = net.value_parameters()
        if net.shared_trunk:
            # The value side's gradient (trunk | value head, as value_flat) has a buffer of
            # its own: the policy side's lands in the network's flat gradient buffer, so
            # both are flat with no copy (a torch.cat of each was about a quarter of a
            # Breakout step on shared-stream).
            self._value_grad = torch.zeros_like(net.value_flat)
            self._value_grad_views = []
            offset = 0
            for param in self._value_params:
                self._value_grad_views.append(
                    self._value_grad[offset:offset + param.numel()].view_as(param))
                offset += param.numel()

    def step(self, delta: float, log_prob: torch.Tensor, entropy: torch.Tensor,
             value: torch.Tensor, beta: float, done: bool,
             on: WeightCopy | None = None) -> dict[str, float]:
        """One update from the TD error; `done` clears the traces after it. `on`: the copy
        of the weights the outputs were computed on, when not the network's own."""
        # stream-x: the entropy bonus is signed by delta so it pushes with the trace.
        policy_objective = -(log_prob + beta * float(np.sign(delta)) * entropy)
        value_objective = -value
        net = self.net
        if net.shared_trunk:
            # The trunk feeds both objectives: each needs its own gradient of it.
            policy_params, value_params = (self._policy_params, self._value_params) \
                if on is None else (on.policy, on.value)
            pi_grad = net.flat_grad[:net.policy_flat.numel()]
            pi_grad.zero_()
            torch.autograd.backward(policy_objective, inputs=policy_params, retain_graph=True)
            v_grad = self._value_grad
            v_grad.zero_()
            own = [param.grad for param in value_params]  # views of net.flat_grad
            for param, view in zip(value_params, self._value_grad_views, strict=True):
                param.grad = view
            try:
                torch.autograd.backward(value_objective, inputs=value_params,
                                        retain_graph=True)
            finally:
                for param, grad in zip(value_params, own, strict=True):
                    param.grad = grad
        else:
            # Disjoint towers: one backward pass into the flat gradient buffer gives
            # each tower its own gradient as a slice.
            net.flat_grad.zero_()
            (policy_objective + value_objective).backward()
            pi_grad = net.flat_grad[:net.policy_flat.numel()]
            v_grad = net.flat_grad[net.policy_flat.numel():]
        # Both sides are checked before either steps: over the shared trunk a policy step
        # taken before the value side refused would change what the value sees.
        step_pi = self.policy.prepare(delta, pi_grad)
        step_v = self.value.prepare(delta, v_grad)
        self.policy.commit(delta, step_pi, reset=done)
        self.value.commit(delta, step_v, reset=done)
        return {"td_error": delta, "actor_loss": -float(log_prob.detach()) * delta,
                "critic_loss": delta * delta, "step_size_policy": step_pi,
                "step_size_value": step_v}

    def reset(self) -> None:
        """Clear the traces: no credit flows across an episode cut."""
        self.policy.trace.zero_()
        self.value.trace.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "value": self.value.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])


class AdamLambda:
    """Adam(lambda): Adam steps along delta * z, z the trace of the gradients of
    log pi + 2c V (what one-step A2C's loss differentiates to when lambda = 0). With
    lambda = 0 there is no trace and the step is plain one-step A2C under Adam."""

    def __init__(self, net: ActorCritic, config: AgentConfig) -> None:
        self.net = net
        self.config = config
        # Adam over the one flat buffer (its gradient is the flat gradient buffer):
        # one fused kernel per step instead of one per parameter tensor.
        net.flat.grad = net.flat_grad
        self.adam = torch.optim.Adam([net.flat], lr=config.lr, eps=config.adam_eps,
                                     fused=True)
        self.trace = torch.zeros_like(net.flat) if config.lambda_ > 0 else None
        # built aside, adopted only when the step is taken
        self._next_trace = torch.zeros_like(net.flat) if config.lambda_ > 0 else None

    def step(self, delta: float, log_prob: torch.Tensor, entropy: torch.Tensor,
             value: torch.Tensor, beta: float, done: bool,
             on: WeightCopy | None = None) -> dict[str, float]:
        """One update from the TD error; `done` clears the trace after it. `on` is not
        needed: the gradients of a WeightCopy land in the flat gradient buffer too."""
        config = self.config
        clip = config.td_error_clip
        # A clipped delta is the derivative of a Huber loss: one surprising transition
        # moves the weights no further than a TD error of `clip` would.
        delta_u = delta if clip is None else max(-clip, min(clip, delta))
        # Gradient of log pi(a|s) + 2c V(s): scaled by delta it is the gradient of the
        # actor loss -delta*log pi plus the critic loss c*delta^2 (V(s') held fixed).
        traced = log_prob + 2.0 * config.critic_coeff * value
        flat_grad = self.net.flat_grad
        flat_grad.zero_()
        trace = self.trace
        if trace is None:
            (-(delta_u * traced + beta * entropy)).backward()
        else:
            # The entropy bonus joins the trace signed by delta (as in ObGD), so the one
            # backward pass gives the whole per-step gradient. The new trace is built aside
            # and adopted only once the step is known to be finite.
            sign = float(np.sign(delta_u))
            (-(traced + beta * sign * entropy)).backward()
            next_trace = self._next_trace
            torch.mul(trace, config.gamma * config.lambda_, out=next_trace).add_(flat_grad)
            torch.mul(next_trace, delta_u, out=flat_grad)
        metrics = {"td_error": delta, "actor_loss": -float(log_prob.detach()) * delta,
                   "critic_loss": config.critic_coeff * delta * delta}
        # Not clip_grad_norm_: it raises RuntimeError (not NonFiniteError) and scales by a
        # float32 coefficient, which is not bit-identical to this float64 one.
        norm = float(torch.linalg.vector_norm(flat_grad))
        if not math.isfinite(norm):
            flat_grad.zero_()
            raise NonFiniteError("gradient is not finite")
        if trace is not None:
            self.trace, self._next_trace = next_trace, trace
        max_norm = config.max_grad_norm
        if max_norm is not None and norm > max_norm:
            flat_grad.mul_(max_norm / (norm + 1e-6))  # as torch's clip_grad_norm_
        metrics["grad_norm"] = norm
        self.adam.step()
        if self.trace is not None and done:
            self.trace.zero_()
        return metrics

    def reset(self) -> None:
        """Clear the trace: no credit flows across an episode cut."""
        if self.trace is not None:
            self.trace.zero_()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"adam": self.adam.state_dict()}
        if self.trace is not None:
            state["trace"] = self.trace.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adam.load_state_dict(self._flat_adam_state(state["adam"]))
        if self.trace is not None:
            trace = state.get("trace")
            if trace is None or trace.shape != self.trace.shape:
                raise ValueError("optimizer state has no Adam(lambda) trace for this "
                                 "network (saved with another lambda?)")
            self.trace.copy_(trace)

    def _flat_adam_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Adam state as this rule keeps it (one flat tensor). Checkpoints written before
        Adam ran on the flat buffer hold one state per parameter tensor, in
        net.parameters() order: they are re-laid into the flat order, so a long run
        survives the upgrade."""
        params = list(self.net.parameters())
        per_tensor = state["param_groups"][0]["params"]
        if len(per_tensor) == 1 or len(per_tensor) != len(params):
            return state  # already flat, or foreign: Adam's own check names the mismatch
        flat = self.net.flat
        merged = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        step = torch.zeros(())
        for index, param in zip(per_tensor, params, strict=True):
            offset = (param.data_ptr() - flat.data_ptr()) // flat.element_size()
            entry = state["state"].get(index)
            if entry is None:
                continue
            for key, merged_tensor in merged.items():
                merged_tensor[offset:offset + param.numel()] = entry[key].reshape(-1)
            step = entry["step"]
        group = {**state["param_groups"][0], "params": [0]}
        return {"state": {0: {"step": step, **merged}}, "param_groups": [group]}


UpdateRule = ObGDRule | AdamLambda


def make_rule(net: ActorCritic, config: AgentConfig, network: str) -> UpdateRule:
    """The update rule config.optimizer names, over `net` (the network named `network`)."""
    return ObGDRule(net, config, network) if config.optimizer == "obgd" \
        else AdamLambda(net, config)
