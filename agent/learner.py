"""The one-step advantage actor-critic learner: `act(obs)` and `update(transition)`.

One update per transition, from the one-step TD error
    delta = r + gamma * (1 - terminated) * V(s') - V(s),
with V(s') from the current parameters and no gradient through it. Truncation
bootstraps; termination does not. The learner knows nothing of environments or files.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agent.config import AgentConfig
from agent.networks import ActorCritic, build_network, resolve_network
from agent.normalizers import RewardScaler
from agent.optimizers import NonFiniteError, ObGD


class Transition(NamedTuple):
    observation: np.ndarray
    action: int
    reward: float
    next_observation: np.ndarray
    terminated: bool
    truncated: bool


class _Pending(NamedTuple):
    """The forward pass `act` made on s, reused by `update` on the same s."""

    observation: np.ndarray
    logits: torch.Tensor
    value: torch.Tensor
    updates: int


_MAX_ENTROPY_GAIN = math.log(100.0)  # beta grows at most 100-fold over its schedule


def _batch(obs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(obs)).unsqueeze(0)


class A2CLearner:
    """Acts from and learns on a single stream, one update per transition."""

    def __init__(self, config: AgentConfig, observation_shape: tuple[int, ...],
                 num_actions: int, seed: int = 0) -> None:
        self.config = config
        self.network_name = resolve_network(config.network, observation_shape)
        self.observation_shape = tuple(observation_shape)
        self.num_actions = num_actions
        torch.manual_seed(seed)  # the initial weights are a function of the seed
        self.net: ActorCritic = build_network(
            config.network, self.observation_shape, num_actions, hidden_size=config.hidden_size,
            sparsity=config.sparsity, normalize=config.normalize_observations)
        self.rng = torch.Generator().manual_seed(seed)
        self.reward_scaler = RewardScaler(config.gamma)
        self.updates = 0
        # log(beta / scheduled beta), raised while the entropy is below entropy_floor.
        self.entropy_gain = 0.0
        self._max_entropy = math.log(num_actions) if num_actions > 1 else 1.0
        self._pending: _Pending | None = None
        self._prepared: tuple[np.ndarray, torch.Tensor] | None = None
        self._ahead: tuple[np.ndarray, float, int] | None = None  # (s', V(s'), updates)
        if config.optimizer == "obgd":
            common = {"lr": config.lr, "gamma": config.gamma, "lambda_": config.lambda_}
            self.policy_opt = ObGD(self.net.policy_flat, kappa=config.kappa_policy, **common)
            self.value_opt = ObGD(self.net.value_flat, kappa=config.kappa_value, **common)
            self._policy_params = self.net.policy_parameters()
            self._value_params = self.net.value_parameters()
        else:
            # Adam over the one flat buffer (its gradient is the flat gradient buffer):
            # one fused kernel per step instead of one per parameter tensor.
            self.net.flat.grad = self.net.flat_grad
            self.adam = torch.optim.Adam([self.net.flat], lr=config.lr, eps=config.adam_eps,
                                         fused=True)
            # Adam(lambda): Adam steps along delta * z, z the trace of the gradients of
            # log pi + 2c V (what one-step A2C's loss differentiates to when lambda = 0).
            self.adam_trace = torch.zeros_like(self.net.flat) if config.lambda_ > 0 else None
            self._next_adam_trace = torch.zeros_like(self.net.flat) if config.lambda_ > 0 \
                else None  # built aside, adopted only when the step is taken

    # -- acting ------------------------------------------------------------------------

    def _inputs(self, observation: np.ndarray) -> torch.Tensor:
        """Preprocessed network input of a new observation, which joins the running
        statistics here, once. The s' of one update is the s of the next act: reused."""
        prepared = self._prepared
        if prepared is not None and prepared[0] is observation:
            return prepared[1]
        if observation.dtype.kind == "f" and not np.isfinite(observation).all():
            raise NonFiniteError("observation is not finite")  # before the statistics see it
        obs = _batch(observation)
        self.net.preprocess.observe(obs)
        inputs = self.net.preprocess(obs)
        self._prepared = (observation, inputs)
        return inputs

    def has_seen(self, observation: np.ndarray) -> bool:
        """True when `observation` already joined the running statistics (as the s' of the
        last update) and the next act() on it will reuse its network input."""
        return self._prepared is not None and self._prepared[0] is observation

    def resume_on(self, observation: np.ndarray, seen: bool) -> None:
        """After load_state_dict, the observation the agent stands on. When the saved
        learner had seen it, its network input is rebuilt (same statistics, same values)
        without counting it again, so the next act() computes what it would have."""
        if seen:
            with torch.no_grad():
                self._prepared = (observation, self.net.preprocess(_batch(observation)))

    def forward(self, observation: np.ndarray) -> None:
        """The forward pass on s, with its graph, kept for the update on s."""
        logits, value = self.net.heads(self._inputs(observation))
        self._pending = _Pending(observation, logits, value, self.updates)

    def act(self, observation: np.ndarray) -> int:
        """Sample an action for s; keeps the forward pass for the update on s."""
        self.forward(observation)
        return self._sample(self._pending.logits)

    def act_ahead(self, next_observation: np.ndarray) -> int:
        """Sample the action for s' *before* the update on (s, a, r, s'): the policy that
        acts lags the learner by one update, so the stream can step on another core while
        the update runs. The no-grad pass also gives the V(s') of that update."""
        with torch.no_grad():
            logits, value = self.net.heads(self._inputs(next_observation))
        self._ahead = (next_observation, float(value[0]), self.updates)
        return self._sample(logits)

    def _sample(self, logits: torch.Tensor) -> int:
        """Inverse-CDF sampling in Python over a handful of action probabilities: a
        fraction of torch.multinomial's cost for one draw."""
        probs = torch.softmax(logits.detach()[0], dim=-1).tolist()
        u = float(torch.rand((), generator=self.rng)) * sum(probs)
        cumulative = 0.0
        for action, p in enumerate(probs):
            cumulative += p
            if u < cumulative:
                return action
        return len(probs) - 1  # u landed on the rounding error at the top

    # -- learning ----------------------------------------------------------------------

    def update(self, t: Transition) -> dict[str, float]:
        """One A2C update from one transition; returns its metrics. A NaN/Inf anywhere
        (reward, observation, TD error, gradient, trace) raises NonFiniteError and leaves
        the learner exactly as it was: everything is computed first, then committed."""
        before = (self._pending, self._prepared, self._ahead)
        try:
            return self._update(t)
        except NonFiniteError:
            if self._prepared is not before[1]:
                self.net.preprocess.undo_observe()  # s' joined the statistics in this update
            self._pending, self._prepared, self._ahead = before
            raise

    def _update(self, t: Transition) -> dict[str, float]:
        if not math.isfinite(t.reward):
            raise NonFiniteError(f"reward {t.reward!r} is not finite")
        pending = self._pending
        self._pending = None
        if pending is not None and pending.observation is t.observation \
                and pending.updates == self.updates:
            logits, value = pending.logits, pending.value
        else:
            logits, value = self.net(_batch(t.observation))
        done = t.terminated or t.truncated
        reward, reward_statistics = self._transform_reward(t.reward, done)
        ahead, self._ahead = self._ahead, None
        if t.terminated:
            next_value = 0.0
        elif ahead is not None and ahead[0] is t.next_observation and ahead[2] == self.updates:
            next_value = ahead[1]  # act_ahead's pass: same s', same parameters
        else:
            with torch.no_grad():
                next_value = float(self.net.value(self._inputs(t.next_observation)))
        delta = reward + self.config.gamma * next_value - value[0]
        delta_f = float(delta.detach())
        if not math.isfinite(delta_f):
            raise NonFiniteError(f"TD error is not finite (reward {t.reward!r})")
        log_probs = F.log_softmax(logits[0], dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum()
        beta = self.config.entropy_at(self.updates) * math.exp(self.entropy_gain)
        if self.config.optimizer == "obgd":
            metrics = self._obgd_step(delta_f, log_probs[t.action], entropy, value[0], beta, done)
        else:
            metrics = self._adam_step(delta_f, log_probs[t.action], entropy, value[0], beta,
                                      done)
        # The step was taken: nothing can refuse the update any more.
        if reward_statistics is not None:
            self.reward_scaler.commit(reward_statistics)
        self.updates += 1
        entropy_f = float(entropy.detach())
        self._adapt_entropy_gain(entropy_f)
        metrics.update(value=float(value[0].detach()), entropy=entropy_f,
                       reward_scaled=reward, entropy_coeff=beta)
        return metrics

    def _adapt_entropy_gain(self, entropy: float) -> None:
        """Entropy floor: a dual step on log beta, like SAC's temperature but one-sided
        (the gain never drops below 0, so above the floor beta is the scheduled one)."""
        floor = self.config.entropy_floor
        if floor is None:
            return
        deficit = floor - entropy / self._max_entropy
        gain = self.entropy_gain + self.config.entropy_floor_rate * deficit
        self.entropy_gain = min(max(gain, 0.0), _MAX_ENTROPY_GAIN)

    def _transform_reward(self, reward: float, done: bool) -> tuple[float, Any]:
        """The reward the update uses, and the reward scaler's statistics after it (to be
        committed once the update is taken; None when the scaler is not used)."""
        mode = self.config.reward_transform
        if mode == "scale":
            return self.reward_scaler.propose(reward, done)
        if mode == "clip":
            return max(-1.0, min(1.0, reward)), None
        return reward, None

    def _obgd_step(self, delta_f: float, log_prob: torch.Tensor, entropy: torch.Tensor,
                   value: torch.Tensor, beta: float, done: bool) -> dict[str, float]:
        # stream-x: the entropy bonus is signed by delta so it pushes with the trace.
        policy_objective = -(log_prob + beta * float(np.sign(delta_f)) * entropy)
        value_objective = -value
        net = self.net
        if net.shared_trunk:
            # The trunk feeds both objectives: each needs its own gradient of it.
            grads = [torch.autograd.grad(objective, params, retain_graph=True)
                     for objective, params in ((policy_objective, self._policy_params),
                                               (value_objective, self._value_params))]
            pi_grad, v_grad = (torch.cat([g.reshape(-1) for g in gs]) for gs in grads)
        else:
            # Disjoint towers: one backward pass into the flat gradient buffer gives
            # each tower its own gradient as a slice.
            net.flat_grad.zero_()
            (policy_objective + value_objective).backward()
            pi_grad = net.flat_grad[:net.policy_flat.numel()]
            v_grad = net.flat_grad[net.policy_flat.numel():]
        # Both sides are checked before either steps: over the shared trunk a policy step
        # taken before the value side refused would change what the value sees.
        step_pi = self.policy_opt.prepare(delta_f, pi_grad)
        step_v = self.value_opt.prepare(delta_f, v_grad)
        self.policy_opt.commit(delta_f, step_pi, reset=done)
        self.value_opt.commit(delta_f, step_v, reset=done)
        return {"td_error": delta_f, "actor_loss": -float(log_prob.detach()) * delta_f,
                "critic_loss": delta_f * delta_f, "step_size_policy": step_pi,
                "step_size_value": step_v}

    def _adam_step(self, delta_f: float, log_prob: torch.Tensor, entropy: torch.Tensor,
                   value: torch.Tensor, beta: float, done: bool) -> dict[str, float]:
        config = self.config
        clip = config.td_error_clip
        # A clipped delta is the derivative of a Huber loss: one surprising transition
        # moves the weights no further than a TD error of `clip` would.
        delta_u = delta_f if clip is None else max(-clip, min(clip, delta_f))
        # Gradient of log pi(a|s) + 2c V(s): scaled by delta it is the gradient of the
        # actor loss -delta*log pi plus the critic loss c*delta^2 (V(s') held fixed).
        traced = log_prob + 2.0 * config.critic_coeff * value
        flat_grad = self.net.flat_grad
        flat_grad.zero_()
        trace = self.adam_trace
        if trace is None:
            (-(delta_u * traced + beta * entropy)).backward()
        else:
            # The entropy bonus joins the trace signed by delta (as in ObGD), so the one
            # backward pass gives the whole per-step gradient. The new trace is built aside
            # and adopted only once the step is known to be finite.
            sign = float(np.sign(delta_u))
            (-(traced + beta * sign * entropy)).backward()
            next_trace = self._next_adam_trace
            torch.mul(trace, config.gamma * config.lambda_, out=next_trace).add_(flat_grad)
            torch.mul(next_trace, delta_u, out=flat_grad)
        metrics = {"td_error": delta_f, "actor_loss": -float(log_prob.detach()) * delta_f,
                   "critic_loss": config.critic_coeff * delta_f * delta_f}
        norm = float(torch.linalg.vector_norm(flat_grad))
        if not math.isfinite(norm):
            flat_grad.zero_()
            raise NonFiniteError("gradient is not finite")
        if trace is not None:
            self.adam_trace, self._next_adam_trace = next_trace, trace
        max_norm = config.max_grad_norm
        if max_norm is not None and norm > max_norm:
            flat_grad.mul_(max_norm / (norm + 1e-6))  # as torch's clip_grad_norm_
        metrics["grad_norm"] = norm
        self.adam.step()
        if trace is not None and done:
            self.adam_trace.zero_()
        return metrics

    def reset_traces(self) -> None:
        """An episode was cut short outside the stream's own ends (a fault): credit must
        not flow across the cut."""
        if self.config.optimizer == "obgd":
            self.policy_opt.trace.zero_()
            self.value_opt.trace.zero_()
        elif self.adam_trace is not None:
            self.adam_trace.zero_()
        self._pending = None
        self._prepared = None
        self._ahead = None

    def _flat_adam_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Adam state as this learner keeps it (one flat tensor). Checkpoints written
        before Adam ran on the flat buffer hold one state per parameter tensor, in
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

    def parameters_finite(self) -> bool:
        """True when no weight is NaN/Inf (checked before every checkpoint)."""
        return bool(torch.isfinite(self.net.flat).all())

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that makes the next update what it is: weights, optimiser state and
        traces, normalisers, the action RNG and the update counter."""
        if self.config.optimizer == "obgd":
            optimizer = {"policy": self.policy_opt.state_dict(),
                         "value": self.value_opt.state_dict()}
        else:
            optimizer = {"adam": self.adam.state_dict()}
            if self.adam_trace is not None:
                optimizer["trace"] = self.adam_trace.clone()
        return {"network": {k: v.clone() for k, v in self.net.state_dict().items()},
                "optimizer": optimizer, "reward_scaler": self.reward_scaler.state_dict(),
                "rng": self.rng.get_state(), "updates": self.updates,
                "entropy_gain": self.entropy_gain}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; raises ValueError if it belongs to a different network."""
        try:
            self.net.load_state_dict(state["network"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ValueError(f"network state does not fit this network: "
                             f"{first[1].strip() if len(first) > 1 else first[0]}") from None
        optimizer = state["optimizer"]
        if self.config.optimizer == "obgd":
            self.policy_opt.load_state_dict(optimizer["policy"])
            self.value_opt.load_state_dict(optimizer["value"])
        else:
            self.adam.load_state_dict(self._flat_adam_state(optimizer["adam"]))
            if self.adam_trace is not None:
                trace = optimizer.get("trace")
                if trace is None or trace.shape != self.adam_trace.shape:
                    raise ValueError("optimizer state has no Adam(lambda) trace for this "
                                     "network (saved with another lambda?)")
                self.adam_trace.copy_(trace)
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        self.rng.set_state(state["rng"])
        self.updates = int(state["updates"])
        self.entropy_gain = float(state.get("entropy_gain", 0.0))  # absent before the floor
        self._pending = None
        self._prepared = None
        self._ahead = None
