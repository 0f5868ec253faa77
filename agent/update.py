"""The one-step actor-critic update as a pure function: (state, step) -> (state, metrics).

Everything an update reads and writes is in `LearnerState`; nothing is changed in place,
so a refused update (a NaN or Inf anywhere) is simply a new state the caller does not
adopt, and the same function runs eagerly or compiled once by torch.compile.

    delta = r + gamma * (1 - terminated) * V(s') - V(s)       # V(s') without gradient

ObGD (Elsayed et al. 2024, "Streaming Deep Reinforcement Learning Finally Works"): the
policy and the value each keep a trace z <- gamma * lambda * z + grad, and step
theta <- theta + alpha_eff * delta * z with
alpha_eff = alpha / max(1, alpha * kappa * max(|delta|, 1) * |z|_1). Over a shared trunk
the two traces overlap on it, each with its own gradient. Adam(lambda) steps Adam along
delta * z instead, z the trace of the gradients of log pi(a|s) + 2c V(s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from agent.config import AgentConfig
from agent.distributions import Categorical
from agent.functional import NetworkPlan, Params, flatten, heads, policy_output, value_output

# log(beta / scheduled beta) stays in [0, ln 100]: beta grows at most 100-fold.
MAX_ENTROPY_GAIN = math.log(100.0)
ADAM_BETAS = (0.9, 0.999)

# Why an update was refused (status 0 = taken).
REFUSALS = {1: "the reward overflows the reward statistics", 2: "TD error is not finite",
            3: "eligibility trace is not finite", 4: "gradient is not finite"}

# The order of the per-step inputs in Step.scalars.
SCALARS = ("action", "reward", "terminated", "done", "next_seen", "beta", "floor")


class ObservationStats(NamedTuple):
    """Welford running statistics of the scaled observations, in float64."""

    count: torch.Tensor  # int64, ()
    mean: torch.Tensor
    m2: torch.Tensor


class ObGDState(NamedTuple):
    policy_trace: torch.Tensor  # over the policy's weights: flat[:plan.policy_size]
    value_trace: torch.Tensor  # over the value's weights: flat[plan.value_start:]


class AdamState(NamedTuple):
    trace: torch.Tensor  # over all weights; empty with lambda = 0
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # float32, ()


class LearnerState(NamedTuple):
    params: torch.Tensor  # the network's weights, flat (agent.functional.NetworkPlan)
    optimizer: ObGDState | AdamState
    observations: ObservationStats | None  # None: observations are not normalised
    rewards: torch.Tensor  # float64 (trace, count, mean, m2) of the reward scaler
    entropy_gain: torch.Tensor  # float64, (): log(beta / scheduled beta)


class Step(NamedTuple):
    """One transition as tensors: observations are batches of one, as the stream gives
    them (uint8 frames or float vectors); `scalars` is float64, in SCALARS order."""

    observation: torch.Tensor
    next_observation: torch.Tensor
    scalars: torch.Tensor


@dataclass(frozen=True)
class UpdateSpec:
    """What stays fixed across updates: the settings and the network's layers."""

    config: AgentConfig
    plan: NetworkPlan
    policy: Categorical
    image_scale: float  # 1/255 for frames, 1 for vectors
    kappa_policy: float
    kappa_value: float


# -- observations and rewards --------------------------------------------------------------

def scaled(spec: UpdateSpec, obs: torch.Tensor) -> torch.Tensor:
    x = obs.float()
    return x * spec.image_scale if spec.image_scale != 1.0 else x


def observe(spec: UpdateSpec, stats: ObservationStats, obs: torch.Tensor
            ) -> ObservationStats:
    """The statistics with one more observation (a batch of one) in them."""
    x = scaled(spec, obs)[0].double()
    count = stats.count + 1
    diff = x - stats.mean
    mean = stats.mean + diff / count
    return ObservationStats(count, mean, stats.m2 + (x - mean) * diff)


def network_input(spec: UpdateSpec, stats: ObservationStats | None, obs: torch.Tensor
                  ) -> torch.Tensor:
    """The observation as the network takes it: scaled, then normalised by `stats`."""
    x = scaled(spec, obs)
    if stats is None:
        return x
    variance = torch.where(stats.count >= 2, stats.m2 / (stats.count - 1).clamp(min=1),
                           torch.ones_like(stats.m2))
    return (x - stats.mean.float()) * torch.rsqrt(variance + 1e-8).float()


def transform_reward(spec: UpdateSpec, rewards: torch.Tensor, reward: torch.Tensor,
                     done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the reward the update uses, the scaler's statistics after it, whether they are
    finite). `scale` divides by the running std of a discounted return trace (stream-x)."""
    mode = spec.config.reward_transform
    if mode == "clip":
        return reward.clamp(-1.0, 1.0), rewards, torch.ones((), dtype=torch.bool)
    if mode == "none":
        return reward, rewards, torch.ones((), dtype=torch.bool)
    trace, count, mean, m2 = rewards.unbind()
    trace = trace * spec.config.gamma + reward
    count = count + 1
    diff = trace - mean
    mean = mean + diff / count
    m2 = m2 + diff * (trace - mean)
    variance = torch.where(count >= 2, m2 / (count - 1).clamp(min=1), torch.ones_like(m2))
    statistics = torch.stack([torch.where(done > 0, 0.0, trace), count, mean, m2])
    return reward / (variance + 1e-8).sqrt(), statistics, torch.isfinite(m2)


# -- the update ----------------------------------------------------------------------------

class _Forward(NamedTuple):
    """What both update rules compute before their step."""

    delta: torch.Tensor  # the TD error, float32
    log_prob: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor
    backward: _Pullback  # cotangents of (log_prob, entropy, value) -> gradient
    beta: torch.Tensor  # the entropy bonus of this update
    reward: torch.Tensor  # the reward as used (transformed)
    observations: ObservationStats | None
    rewards: torch.Tensor
    rewards_ok: torch.Tensor


def _td_error(spec: UpdateSpec, state: LearnerState, step: Step) -> _Forward:
    """The TD error, from a forward pass on s with its vector-Jacobian product kept for
    the gradients, and V(s') from the current weights without one."""
    action, reward, terminated, done, next_seen, beta, _ = step.scalars.unbind()
    stats = state.observations
    next_stats = stats
    if stats is not None:  # s' joins the statistics, unless it is terminal or already has
        observed = observe(spec, stats, step.next_observation)
        keep = (terminated > 0) | (next_seen > 0)
        next_stats = ObservationStats(*(torch.where(keep, old, new)
                                        for old, new in zip(stats, observed, strict=True)))
    reward, rewards, rewards_ok = transform_reward(spec, state.rewards, reward, done)
    weights = spec.plan.unflatten(state.params)
    with torch.no_grad():
        next_value = value_output(spec.plan, weights,
                                  network_input(spec, next_stats, step.next_observation))
    next_value = torch.where(terminated > 0, 0.0, next_value)
    inputs = network_input(spec, stats, step.observation)
    policy, action = spec.policy, action.long()

    def outputs(params: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, value = heads(spec.plan, params, inputs)
        return policy.log_prob(logits, action), policy.entropy(logits), value

    backward = _Pullback(outputs, weights)
    log_prob, entropy, value = (t.detach() for t in backward.outputs)
    delta = reward.float() + spec.config.gamma * next_value - value
    return _Forward(delta, log_prob, entropy, value, backward,
                    beta * state.entropy_gain.exp(), reward, next_stats, rewards, rewards_ok)


class _Pullback:
    """The vector-Jacobian product of the forward pass on s: gradients over the weights
    for given cotangents of (log_prob, entropy, value). Compiled, it is torch.func.vjp's,
    which a graph can hold; eagerly, plain autograd's, which computes the same with a
    fraction of functorch's per-operation overhead."""

    def __init__(self, fn: Callable[[Params], tuple], params: Params) -> None:
        if torch.compiler.is_compiling():
            self.outputs, self._pullback = torch.func.vjp(fn, params)
            self._leaves: Params = ()
        else:
            self._leaves = tuple(p.detach().requires_grad_() for p in params)
            self.outputs = fn(self._leaves)

    def __call__(self, cotangents: tuple) -> torch.Tensor:
        """The gradient over all weights, flat."""
        if not self._leaves:
            return flatten(self._pullback(cotangents)[0])
        return flatten(torch.autograd.grad(self.outputs, self._leaves, cotangents,
                                           retain_graph=True, allow_unused=True,
                                           materialize_grads=True))

    def both(self, first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients for two sets of cotangents; compiled, in one backward pass."""
        if self._leaves:
            return self(first), self(second)
        stacked = tuple(torch.stack([a, b]) for a, b in zip(first, second, strict=True))
        (grads,) = torch.func.vmap(self._pullback)(stacked)
        return flatten([g[0] for g in grads]), flatten([g[1] for g in grads])


def _gradients(plan: NetworkPlan, pullback: _Pullback, policy_cotangent: tuple,
               value_cotangent: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the policy's objective over its weights and of the value's over
    its own. Over a shared trunk each needs its own gradient of it. Separate towers
    share nothing: one backward pass of the sum gives each tower exactly its own
    objective's gradient."""
    if plan.shared_trunk:
        policy, value = pullback.both(policy_cotangent, value_cotangent)
    else:
        policy = value = pullback(tuple(p + v for p, v in
                                        zip(policy_cotangent, value_cotangent, strict=True)))
    return policy[:plan.policy_size], value[plan.value_start:]


def _decayed(decay: float, trace: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if decay == 0.0:  # lambda = 0: exactly this step's gradient (pure one-step)
        return grad
    return grad.add(trace, alpha=decay)


def _bounded_step(lr: float, kappa: float, delta: torch.Tensor, trace_l1: torch.Tensor
                  ) -> torch.Tensor:
    """ObGD's step size: alpha, shrunk where one step could overshoot the TD error."""
    bound = lr * kappa * delta.abs().clamp(min=1.0) * trace_l1
    return torch.where(bound > 1.0, lr / bound, torch.full_like(bound, lr))


def _obgd_step(plan: NetworkPlan, params: torch.Tensor, policy_rate: torch.Tensor,
               policy_trace: torch.Tensor, value_rate: torch.Tensor,
               value_trace: torch.Tensor) -> torch.Tensor:
    """theta - rate * z for both: the policy's step moves its head and the trunk, the
    value's the trunk and its head."""
    head, shared = plan.value_start, plan.policy_size
    trunk = params[head:shared].addcmul(policy_trace[head:], -policy_rate)
    return torch.cat([params[:head].addcmul(policy_trace[:head], -policy_rate),
                      trunk.addcmul_(value_trace[:shared - head], -value_rate),
                      params[shared:].addcmul(value_trace[shared - head:], -value_rate)])


def _cleared(done: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    return torch.where(done > 0, 0.0, trace)


def _adapted_gain(spec: UpdateSpec, gain: torch.Tensor, entropy: torch.Tensor,
                  floor: torch.Tensor) -> torch.Tensor:
    """Entropy floor: a one-sided dual step on log beta (like SAC's temperature), so
    above the floor beta is the scheduled one and below it beta grows."""
    config = spec.config
    if config.entropy_floor is None:
        return gain
    deficit = floor - entropy.double() / spec.policy.max_entropy
    return (gain + config.entropy_floor_rate * deficit).clamp(0.0, MAX_ENTROPY_GAIN)


def _status(*failures: torch.Tensor) -> torch.Tensor:
    """0 when every check passed, else the REFUSALS code of the first that failed."""
    status = torch.zeros((), dtype=torch.int64)
    for code in reversed(range(len(failures))):
        status = torch.where(failures[code], code + 1, status)
    return status


def obgd_update(spec: UpdateSpec, state: LearnerState, step: Step
                ) -> tuple[LearnerState, torch.Tensor, torch.Tensor]:
    """One ObGD update. Returns (new state, metrics in OBGD_METRICS order, status)."""
    config, plan = spec.config, spec.plan
    done, floor = step.scalars[3], step.scalars[6]
    f = _td_error(spec, state, step)
    zero, one = torch.zeros_like(f.value), torch.ones_like(f.value)
    # stream-x: the entropy bonus is signed by delta so that it pushes with the trace
    policy_grad, value_grad = _gradients(
        plan, f.backward, (-one, -f.beta.float() * torch.sign(f.delta), zero),
        (zero, zero, -one))
    decay = config.gamma * config.lambda_
    policy_trace = _decayed(decay, state.optimizer.policy_trace, policy_grad)
    value_trace = _decayed(decay, state.optimizer.value_trace, value_grad)
    policy_l1, value_l1 = policy_trace.abs().sum(), value_trace.abs().sum()
    policy_step = _bounded_step(config.lr, spec.kappa_policy, f.delta, policy_l1)
    value_step = _bounded_step(config.lr, spec.kappa_value, f.delta, value_l1)
    params = _obgd_step(plan, state.params, policy_step * f.delta, policy_trace,
                        value_step * f.delta, value_trace)
    new_state = LearnerState(
        params, ObGDState(_cleared(done, policy_trace), _cleared(done, value_trace)),
        f.observations, f.rewards, _adapted_gain(spec, state.entropy_gain, f.entropy, floor))
    metrics = torch.stack([t.double() for t in (
        f.delta, -f.log_prob * f.delta, f.delta * f.delta, policy_step, value_step, f.value,
        f.entropy, f.reward, f.beta)])
    status = _status(~f.rewards_ok, ~torch.isfinite(f.delta),
                     ~(torch.isfinite(policy_l1) & torch.isfinite(value_l1)))
    return new_state, metrics, status


def adam_update(spec: UpdateSpec, state: LearnerState, step: Step
                ) -> tuple[LearnerState, torch.Tensor, torch.Tensor]:
    """One Adam(lambda) update. Returns (new state, metrics in ADAM_METRICS order, status)."""
    config = spec.config
    done = step.scalars[3]
    adam = state.optimizer
    f = _td_error(spec, state, step)
    # A clipped delta is the derivative of a Huber loss: one surprising transition moves
    # the weights no further than a TD error of `clip` would.
    clip = config.td_error_clip
    delta = f.delta if clip is None else f.delta.clamp(-clip, clip)
    beta, critic = f.beta.float(), 2.0 * config.critic_coeff
    if config.lambda_ > 0:
        # the gradient of -(log pi + 2c V + beta sign(delta) H), traced, times delta
        grad = f.backward((-torch.ones_like(delta), -beta * torch.sign(delta),
                           torch.full_like(delta, -critic)))
        trace = _decayed(config.gamma * config.lambda_, adam.trace, grad)
        grad = delta * trace
    else:
        # the one-step A2C loss -delta log pi + c delta^2 - beta H (V(s') held fixed)
        grad = f.backward((-delta, -beta, -critic * delta))
        trace = adam.trace  # empty
    norm = torch.linalg.vector_norm(grad)
    if config.max_grad_norm is not None:
        max_norm = config.max_grad_norm
        grad = grad * torch.where(norm > max_norm, max_norm / (norm + 1e-6), 1.0)
    count = adam.step + 1
    beta1, beta2 = ADAM_BETAS
    exp_avg = adam.exp_avg * beta1 + grad * (1 - beta1)
    exp_avg_sq = adam.exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    step_size = config.lr / (1 - beta1 ** count)
    root_correction = (1 - beta2 ** count).sqrt()
    params = state.params - step_size * exp_avg / (exp_avg_sq.sqrt() / root_correction
                                                   + config.adam_eps)
    new_state = LearnerState(
        params, AdamState(_cleared(done, trace), exp_avg, exp_avg_sq, count),
        f.observations, f.rewards, _adapted_gain(spec, state.entropy_gain, f.entropy,
                                                 step.scalars[6]))
    metrics = torch.stack([t.double() for t in (
        f.delta, -f.log_prob * f.delta, config.critic_coeff * f.delta * f.delta, norm,
        f.value, f.entropy, f.reward, f.beta)])
    status = _status(~f.rewards_ok, ~torch.isfinite(f.delta), torch.zeros((), dtype=bool),
                     ~torch.isfinite(norm))
    return new_state, metrics, status


OBGD_METRICS = ("td_error", "actor_loss", "critic_loss", "step_size_policy",
                "step_size_value", "value", "entropy", "reward_scaled", "entropy_coeff")
ADAM_METRICS = ("td_error", "actor_loss", "critic_loss", "grad_norm", "value", "entropy",
                "reward_scaled", "entropy_coeff")


def policy_logits(spec: UpdateSpec, params: torch.Tensor, stats: ObservationStats | None,
                  obs: torch.Tensor) -> torch.Tensor:
    """The policy head's output on one observation (a batch of one)."""
    with torch.no_grad():
        return policy_output(spec.plan, spec.plan.unflatten(params),
                             network_input(spec, stats, obs))


def update_and_act(spec: UpdateSpec, state: LearnerState, step: Step
                   ) -> tuple[LearnerState, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One update by the configured rule, then the policy's logits on s' from the weights
    and statistics it made: the next action comes out of the same call. Returns (new
    state, metrics, status, logits on s')."""
    rule = obgd_update if spec.config.optimizer == "obgd" else adam_update
    new_state, metrics, status = rule(spec, state, step)
    return new_state, metrics, status, policy_logits(
        spec, new_state.params, new_state.observations, step.next_observation)

