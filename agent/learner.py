"""The one-step advantage actor-critic learner: `act(obs)` and `update(transition)`.

A thin shell around the pure functions of agent/update.py: it holds the LearnerState,
turns numpy transitions into tensors, adopts a new state only when the update says it is
finite, samples actions, and converts the state to and from checkpoints. The learner
knows nothing of environments or files.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from agent.compiled import Compiled
from agent.config import AgentConfig
from agent.distributions import Categorical
from agent.errors import NonFiniteError
from agent.functional import NetworkPlan, network_params
from agent.migration import flat_adam_state
from agent.networks import ActorCritic, build_network, resolve_network
from agent.update import (
    ADAM_BETAS,
    ADAM_METRICS,
    OBGD_METRICS,
    REFUSALS,
    AdamState,
    LearnerState,
    ObGDState,
    ObservationStats,
    Step,
    UpdateSpec,
    observe,
    policy_logits,
    update_and_act,
)


class Transition(NamedTuple):
    observation: np.ndarray
    action: int
    reward: float
    next_observation: np.ndarray
    terminated: bool
    truncated: bool


def _batch(obs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(obs)).unsqueeze(0)


def _finite(obs: np.ndarray) -> bool:
    return obs.dtype.kind != "f" or bool(np.isfinite(obs).all())


class A2CLearner:
    """Acts from and learns on a single stream, one update per transition."""

    def __init__(self, config: AgentConfig, observation_shape: tuple[int, ...],
                 num_actions: int, seed: int = 0) -> None:
        self.config = config
        self.network_name = resolve_network(config.network, observation_shape)
        self.observation_shape = tuple(observation_shape)
        self.num_actions = num_actions
        # The initial weights are a function of the seed, drawn from torch's global RNG
        # inside fork_rng so that the process's own random stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._net: ActorCritic = build_network(
                config.network, self.observation_shape, num_actions,
                hidden_size=config.hidden_size, sparsity=config.sparsity,
                normalize=config.normalize_observations)
        self.rng = torch.Generator().manual_seed(seed)
        self.spec = UpdateSpec(config, NetworkPlan.of(self._net), Categorical(num_actions),
                               self._net.preprocess.scale, *config.kappas(self.network_name))
        self.state = self._initial_state(network_params(self._net))
        self.updates = 0
        # The observation that last joined the running statistics (matched by identity:
        # the loop hands the learner the same array as s' of one update and s of the next
        # act), so that each observation is counted once.
        self._seen: np.ndarray | None = None
        compiled = config.compile in (True, "auto")
        spec = self.spec
        self._metric_names = OBGD_METRICS if config.optimizer == "obgd" else ADAM_METRICS
        # The policy's logits on the observation last seen, as the last update left them.
        self._next_logits: torch.Tensor | None = None

        def update(state: LearnerState, step: Step) -> tuple:
            return update_and_act(spec, state, step)

        def act(params: torch.Tensor, stats: ObservationStats | None, obs: torch.Tensor,
                seen: bool) -> tuple:
            if stats is not None and not seen:
                stats = observe(spec, stats, obs)
            return policy_logits(spec, params, stats, obs), stats

        self._update = Compiled(update, "learner update", compiled)
        self._act = Compiled(act, "learner act", compiled)

    def _initial_state(self, params: torch.Tensor) -> LearnerState:
        plan = self.spec.plan
        if self.config.optimizer == "obgd":
            optimizer: ObGDState | AdamState = ObGDState(
                torch.zeros(plan.policy_size), torch.zeros(plan.size - plan.value_start))
        else:
            trace = torch.zeros(plan.size if self.config.lambda_ > 0 else 0)
            optimizer = AdamState(trace, torch.zeros(plan.size), torch.zeros(plan.size),
                                  torch.zeros(()))
        stats = None
        if self.config.normalize_observations:
            mean = torch.zeros(self.observation_shape, dtype=torch.float64)
            stats = ObservationStats(torch.zeros((), dtype=torch.int64), mean,
                                     torch.zeros_like(mean))
        return LearnerState(params, optimizer, stats, torch.zeros(4, dtype=torch.float64),
                            torch.zeros((), dtype=torch.float64))

    @property
    def compiled(self) -> bool:
        """Whether the update runs compiled (False: eager, by setting or fallback)."""
        return self._update.enabled

    # -- acting ------------------------------------------------------------------------

    def _logits(self, observation: np.ndarray) -> torch.Tensor:
        """The policy head's output on `observation`; an observation not seen before joins
        the running statistics."""
        seen = observation is self._seen
        if seen and self._next_logits is not None:
            return self._next_logits
        if not seen and not _finite(observation):
            raise NonFiniteError("observation is not finite")  # before the statistics see it
        logits, stats = self._act(self.state.params, self.state.observations,
                                  _batch(observation), seen)
        if not seen:
            self.state = self.state._replace(observations=stats)
            self._seen = observation
        return logits

    def act(self, observation: np.ndarray) -> int:
        """Sample an action for s."""
        return Categorical.sample(self._logits(observation), self.rng)

    def has_seen(self, observation: np.ndarray) -> bool:
        """True when `observation` already joined the running statistics (as the s' of the
        last update), so the next act() does not count it again."""
        return observation is self._seen

    def resume_on(self, observation: np.ndarray, seen: bool) -> None:
        """After load_state_dict, the observation the agent stands on, and whether the
        saved learner had counted it (then the next act() does not count it again)."""
        self._seen = observation if seen else None
        self._next_logits = None

    # -- learning ----------------------------------------------------------------------

    def update(self, t: Transition) -> dict[str, float]:
        """One A2C update from one transition; returns its metrics. A NaN/Inf anywhere
        (reward, observation, TD error, gradient, trace) raises NonFiniteError and leaves
        the learner exactly as it was: the new state is adopted only when finite."""
        if not math.isfinite(t.reward):
            raise NonFiniteError(f"reward {t.reward!r} is not finite")
        next_seen = t.next_observation is self._seen
        if not t.terminated and not next_seen and not _finite(t.next_observation):
            raise NonFiniteError("observation is not finite")
        config = self.config
        floor = config.floor_at(self.updates + 1)
        scalars = torch.tensor(
            [t.action, t.reward, t.terminated, t.terminated or t.truncated, next_seen,
             config.entropy_at(self.updates), math.nan if floor is None else floor],
            dtype=torch.float64)
        state, metrics, status, next_logits = self._update(
            self.state, Step(_batch(t.observation), _batch(t.next_observation), scalars))
        refusal = int(status)
        if refusal:
            raise NonFiniteError(f"{REFUSALS[refusal]} (reward {t.reward!r})")
        self.state = state
        self.updates += 1
        self._seen = None if t.terminated else t.next_observation
        self._next_logits = None if t.terminated else next_logits
        return dict(zip(self._metric_names, metrics.tolist(), strict=True))

    def reset_traces(self) -> None:
        """An episode was cut short outside the stream's own ends (a fault): credit must
        not flow across the cut."""
        optimizer = self.state.optimizer
        if isinstance(optimizer, ObGDState):
            cleared: ObGDState | AdamState = ObGDState(
                torch.zeros_like(optimizer.policy_trace), torch.zeros_like(optimizer.value_trace))
        else:  # Adam's moments are not traces: they stay
            cleared = optimizer._replace(trace=torch.zeros_like(optimizer.trace))
        self.state = self.state._replace(optimizer=cleared)
        self._seen = self._next_logits = None

    def parameters_finite(self) -> bool:
        """True when no weight is NaN/Inf (checked before every checkpoint)."""
        return bool(torch.isfinite(self.state.params).all())

    # -- the network and the state -----------------------------------------------------

    @property
    def net(self) -> ActorCritic:
        """The network module with the learner's current weights and statistics copied
        in: what is exported and saved (the update itself never reads it)."""
        net = self._net
        with torch.no_grad():
            weights = self.spec.plan.unflatten(self.state.params)
            for param, value in zip(net.flat_order(), weights, strict=True):
                param.copy_(value)
            stats, norm = self.state.observations, net.preprocess.norm
            if stats is not None and norm is not None:
                norm.load_state_dict(
                    {"count": stats.count, "mean": stats.mean, "m2": stats.m2})
        return net

    def state_dict(self) -> dict[str, Any]:
        """Everything that makes the next update what it is: weights and normaliser
        statistics (as the network's state dict), optimiser state and traces, the reward
        scaler, the action RNG and the update counter."""
        trace, count, mean, m2 = self.state.rewards.tolist()
        return {"network": {k: v.clone() for k, v in self.net.state_dict().items()},
                "optimizer": _optimizer_state_dict(self.state.optimizer, self.config),
                "reward_scaler": {"trace": trace, "count": int(count), "mean": mean,
                                  "m2": m2},
                "rng": self.rng.get_state(), "updates": self.updates,
                "entropy_gain": float(self.state.entropy_gain)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; raises ValueError if it belongs to a different network."""
        net = self._net
        try:
            net.load_state_dict(state["network"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ValueError(f"network state does not fit this network: "
                             f"{first[1].strip() if len(first) > 1 else first[0]}") from None
        params = network_params(net)
        fresh = self._initial_state(params)
        stats = fresh.observations
        if stats is not None:
            norm = net.preprocess.norm
            stats = ObservationStats(norm.count.clone(), norm.mean.clone(), norm.m2.clone())
        scaler = state["reward_scaler"]
        rewards = torch.tensor([float(scaler[k]) for k in ("trace", "count", "mean", "m2")],
                               dtype=torch.float64)
        optimizer = _load_optimizer(state["optimizer"], fresh.optimizer, self.config, net)
        self.state = LearnerState(params, optimizer, stats, rewards, torch.tensor(
            float(state.get("entropy_gain", 0.0)), dtype=torch.float64))
        self.rng.set_state(state["rng"])
        self.updates = int(state["updates"])
        self._seen = self._next_logits = None


# -- the optimiser's state in checkpoints: flat tensors, as torch.optim keeps them -----------

def _checked(tensor: Any, like: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.numel() != like.numel():
        have = tensor.numel() if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{what} has {have} elements, the network {like.numel()}")
    return tensor.detach().reshape(like.shape).to(like.dtype).clone()


def _optimizer_state_dict(optimizer: ObGDState | AdamState, config: AgentConfig
                          ) -> dict[str, Any]:
    if isinstance(optimizer, ObGDState):
        return {"policy": {"trace": optimizer.policy_trace.clone()},
                "value": {"trace": optimizer.value_trace.clone()}}
    state: dict[str, Any] = {"adam": {
        "state": {0: {"step": optimizer.step.clone(), "exp_avg": optimizer.exp_avg.clone(),
                      "exp_avg_sq": optimizer.exp_avg_sq.clone()}},
        "param_groups": [{"lr": config.lr, "betas": ADAM_BETAS, "eps": config.adam_eps,
                          "params": [0]}]}}
    if config.lambda_ > 0:
        state["trace"] = optimizer.trace.clone()
    return state


def _load_optimizer(state: dict[str, Any], fresh: ObGDState | AdamState,
                    config: AgentConfig, net: ActorCritic) -> ObGDState | AdamState:
    if isinstance(fresh, ObGDState):
        return ObGDState(_checked(state["policy"]["trace"], fresh.policy_trace, "ObGD trace"),
                         _checked(state["value"]["trace"], fresh.value_trace, "ObGD trace"))
    adam = flat_adam_state(state["adam"], net)["state"].get(0)
    moments = (fresh.exp_avg, fresh.exp_avg_sq, fresh.step)  # saved before the first step
    if adam is not None:
        moments = (_checked(adam["exp_avg"], fresh.exp_avg, "Adam state"),
                   _checked(adam["exp_avg_sq"], fresh.exp_avg_sq, "Adam state"),
                   torch.as_tensor(adam["step"], dtype=torch.float32).clone().reshape(()))
    trace = fresh.trace
    if config.lambda_ > 0:
        if state.get("trace") is None:
            raise ValueError("optimizer state has no Adam(lambda) trace for this network "
                             "(saved with another lambda?)")
        trace = _checked(state["trace"], fresh.trace, "Adam(lambda) trace")
    return AdamState(trace, *moments)
