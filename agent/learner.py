"""The one-step advantage actor-critic learner: `act(obs)` and `update(transition)`.

One update per transition, from the one-step TD error
    delta = r + gamma * (1 - terminated) * V(s') - V(s),
with V(s') from the current parameters and no gradient through it. Truncation
bootstraps; termination does not. The learner knows nothing of environments or files.

With `agent.reuse_next_pass` the pass on s' keeps its graph, on a copy of the weights
θ_t before update t, and update t+1 takes it as its pass on s: one forward pass per
step. The action on s' and the gradient of update t+1 then come from θ_t, one update
stale, and its TD error is r + gamma * V_θ{t+1}(s'') - V_θt(s'): the stale value is the
one of the state being learned about, the bootstrap value is current.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agent.config import AgentConfig
from agent.errors import NonFiniteError
from agent.networks import ActorCritic, WeightCopy, build_network, resolve_network
from agent.normalizers import RewardScaler
from agent.optimizers import make_rule


class Transition(NamedTuple):
    observation: np.ndarray
    action: int
    reward: float
    next_observation: np.ndarray
    terminated: bool
    truncated: bool


@dataclass(eq=False)  # matched by identity, like the arrays it holds
class _Pass:
    """The learner's work on one observation, kept while the agent stands on it or is
    about to. Matched by identity: the loop hands the learner the same array as s' of one
    update and as s of the next act.

    `inputs`: the network input; making it added the observation to the running
    statistics, so a pass is made once per observation and reused. `logits`/`value`: the
    heads' outputs (with a graph from `stand_on`, without one from `act_ahead`), valid
    for the parameters after `updates` updates only.

    `on`: the weight copy the graph is on, for a pass kept by an update for the next act
    (agent.reuse_next_pass); `kept` until an act has used it."""

    observation: np.ndarray
    inputs: torch.Tensor
    logits: torch.Tensor | None = None
    value: torch.Tensor | None = None
    updates: int = -1
    on: WeightCopy | None = None
    kept: bool = False

    def outputs_for(self, observation: np.ndarray, updates: int) -> bool:
        """True when the heads' outputs on `observation` are those of the parameters now."""
        return self.observation is observation and self.updates == updates \
            and self.logits is not None


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
        # The initial weights are a function of the seed, drawn from torch's global RNG
        # inside fork_rng so that the process's own random stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net: ActorCritic = build_network(
                config.network, self.observation_shape, num_actions,
                hidden_size=config.hidden_size, sparsity=config.sparsity,
                normalize=config.normalize_observations)
        self.rng = torch.Generator().manual_seed(seed)
        self.reward_scaler = RewardScaler(config.gamma)
        self.updates = 0
        # log(beta / scheduled beta), raised while the entropy is below entropy_floor.
        self.entropy_gain = 0.0
        self._max_entropy = math.log(num_actions) if num_actions > 1 else 1.0
        # The pass on the observation the agent stands on (s before an update, s' after),
        # and, in the overlapped loop, the pass on s' made before the update on s -> s'.
        self._here: _Pass | None = None
        self._ahead: _Pass | None = None
        # reuse_next_pass: two copies, as the kept pass's graph is still needed while the
        # next one is made; and the weights of a kept pass read from a checkpoint.
        self._copies = (WeightCopy(self.net), WeightCopy(self.net)) \
            if config.reuses_next_pass(self.network_name) else ()
        self._resumed_copy: torch.Tensor | None = None
        # owns its traces and optimiser state
        self.rule = make_rule(self.net, config, self.network_name)

    # -- acting ------------------------------------------------------------------------

    def _pass_on(self, observation: np.ndarray) -> _Pass:
        """The pass on `observation`: the one already made, or a new one, for which the
        observation joins the running statistics (once)."""
        for known in (self._here, self._ahead):
            if known is not None and known.observation is observation:
                return known
        if observation.dtype.kind == "f" and not np.isfinite(observation).all():
            raise NonFiniteError("observation is not finite")  # before the statistics see it
        obs = _batch(observation)
        self.net.preprocess.observe(obs)
        return _Pass(observation, self.net.preprocess(obs))

    def has_seen(self, observation: np.ndarray) -> bool:
        """True when `observation` already joined the running statistics (as the s' of the
        last update) and the next act() on it will reuse its network input."""
        return self._here is not None and self._here.observation is observation

    def resume_on(self, observation: np.ndarray, seen: bool) -> None:
        """After load_state_dict, the observation the agent stands on. When the saved
        learner had seen it, its network input is rebuilt (same statistics, same values)
        without counting it again, so the next act() computes what it would have."""
        resumed_copy, self._resumed_copy = self._resumed_copy, None
        if seen:
            with torch.no_grad():
                self._here = _Pass(observation, self.net.preprocess(_batch(observation)))
            if resumed_copy is not None and self._copies:  # the kept pass, made again
                copy = self._copies[0]
                copy.flat.copy_(resumed_copy)
                self._keep(self._here, *copy.heads(self._here.inputs), copy, self.updates - 1)

    def stand_on(self, observation: np.ndarray) -> torch.Tensor:
        """The forward pass on s with its graph, kept for the update on s; returns the
        logits. A pass kept by the last update (reuse_next_pass) serves once; a second act
        on the same s (after a refused update) makes a fresh one."""
        here = self._here = self._pass_on(observation)
        if here.kept:
            here.kept = False
            return here.logits
        here.logits, here.value = self.net.heads(here.inputs)
        here.on = None
        here.updates = self.updates
        return here.logits

    def act(self, observation: np.ndarray) -> int:
        """Sample an action for s; keeps the forward pass for the update on s."""
        return self._sample(self.stand_on(observation))

    def act_ahead(self, next_observation: np.ndarray) -> int:
        """Sample the action for s' *before* the update on (s, a, r, s'): the policy that
        acts lags the learner by one update, so the stream can step on another core while
        the update runs. The pass also gives the V(s') of that update. With
        reuse_next_pass it is the pass that update keeps (with its graph, on a weight
        copy), made now instead of inside the update: the same numbers, the same draws."""
        ahead = self._ahead = self._pass_on(next_observation)
        if self._copies:
            copy = self._free_copy()
            copy.take()
            ahead.logits, ahead.value = copy.heads(ahead.inputs)
            ahead.on = copy
        else:
            with torch.no_grad():
                ahead.logits, ahead.value = self.net.heads(ahead.inputs)
        ahead.updates = self.updates
        return self._sample(ahead.logits)

    def _free_copy(self) -> WeightCopy:
        """reuse_next_pass: the weight copy the standing pass is not on (its graph is still
        needed by the update on s, and a refused update must leave it intact)."""
        standing = self._here.on if self._here is not None else None
        return self._copies[self._copies[0] is standing]

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
        if not math.isfinite(t.reward):
            raise NonFiniteError(f"reward {t.reward!r} is not finite")
        here = self._here
        on = None
        if here is not None and (here.outputs_for(t.observation, self.updates) or (
                here.on is not None and here.outputs_for(t.observation, self.updates - 1))):
            # stand_on's pass: same s, same weights; or the kept pass, one update stale
            logits, value, on = here.logits, here.value, here.on
        else:
            logits, value = self.net(_batch(t.observation))
        next_pass = None if t.terminated else self._pass_on(t.next_observation)
        seen_before = next_pass is here or next_pass is self._ahead
        try:
            metrics = self._learn(t, logits, value, next_pass, on)
        except NonFiniteError:
            if next_pass is not None and not seen_before:
                self.net.preprocess.undo_observe()  # s' joined the statistics above
            raise
        self._here, self._ahead = next_pass, None  # the agent now stands on s'
        return metrics

    def _learn(self, t: Transition, logits: torch.Tensor, value: torch.Tensor,
               next_pass: _Pass | None, on: WeightCopy | None) -> dict[str, float]:
        """The TD error, the rule's step and what follows it; raises NonFiniteError
        before anything is changed. `on`: the weight copy logits and value come from."""
        done = t.terminated or t.truncated
        reward, reward_statistics = self._transform_reward(t.reward, done)
        kept = None
        if next_pass is None:  # terminated: no bootstrap
            next_value = 0.0
        elif next_pass.outputs_for(t.next_observation, self.updates):
            # act_ahead's pass: same s', same weights (kept with reuse_next_pass)
            next_value = float(next_pass.value[0].detach())
            if next_pass.on is not None and not done:
                kept = (next_pass.logits, next_pass.value, next_pass.on)
        elif self._copies and not done:
            # reuse_next_pass: the pass on s' with its graph, on a copy of the weights as
            # they are now. No graph after a truncation: a reset follows.
            copy = self._free_copy()
            copy.take()
            kept = (*copy.heads(next_pass.inputs), copy)
            next_value = float(kept[1][0].detach())
        else:
            with torch.no_grad():
                next_value = float(self.net.value(next_pass.inputs))
        delta = reward + self.config.gamma * next_value - value[0]
        delta_f = float(delta.detach())
        if not math.isfinite(delta_f):
            raise NonFiniteError(f"TD error is not finite (reward {t.reward!r})")
        log_probs = F.log_softmax(logits[0], dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum()
        beta = self.config.entropy_at(self.updates) * math.exp(self.entropy_gain)
        metrics = self.rule.step(delta_f, log_probs[t.action], entropy, value[0], beta, done,
                                 on)
        # The step was taken: nothing can refuse the update any more.
        if kept is not None:
            self._keep(next_pass, *kept, self.updates)
        if reward_statistics is not None:
            self.reward_scaler.commit(reward_statistics)
        self.updates += 1
        entropy_f = float(entropy.detach())
        self._adapt_entropy_gain(entropy_f)
        metrics.update(value=float(value[0].detach()), entropy=entropy_f,
                       reward_scaled=reward, entropy_coeff=beta)
        return metrics

    @staticmethod
    def _keep(kept: _Pass, logits: torch.Tensor, value: torch.Tensor, on: WeightCopy,
              updates: int) -> None:
        """Keep a pass made on a weight copy for the next act and update."""
        kept.logits, kept.value, kept.on, kept.updates, kept.kept = logits, value, on, \
            updates, True

    def _adapt_entropy_gain(self, entropy: float) -> None:
        """Entropy floor: a dual step on log beta, like SAC's temperature but one-sided
        (the gain never drops below 0, so above the floor beta is the scheduled one)."""
        floor = self.config.floor_at(self.updates)
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

    def reset_traces(self) -> None:
        """An episode was cut short outside the stream's own ends (a fault): credit must
        not flow across the cut."""
        self.rule.reset()
        self._here = self._ahead = None
        self._resumed_copy = None

    def parameters_finite(self) -> bool:
        """True when no weight is NaN/Inf (checked before every checkpoint)."""
        return bool(torch.isfinite(self.net.flat).all())

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that makes the next update what it is: weights, optimiser state and
        traces, normalisers, the action RNG and the update counter; with reuse_next_pass
        also the weights the kept pass was made on (a graph cannot be saved: resume_on
        makes it again from them)."""
        state = {"network": {k: v.clone() for k, v in self.net.state_dict().items()},
                 "optimizer": self.rule.state_dict(),
                 "reward_scaler": self.reward_scaler.state_dict(), "rng": self.rng.get_state(),
                 "updates": self.updates, "entropy_gain": self.entropy_gain}
        here = self._here
        if here is not None and here.kept:
            state["kept_pass_weights"] = here.on.flat.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; raises ValueError if it belongs to a different network."""
        try:
            self.net.load_state_dict(state["network"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ValueError(f"network state does not fit this network: "
                             f"{first[1].strip() if len(first) > 1 else first[0]}") from None
        self.rule.load_state_dict(state["optimizer"])
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        self.rng.set_state(state["rng"])
        self.updates = int(state["updates"])
        self.entropy_gain = float(state.get("entropy_gain", 0.0))  # absent before the floor
        self._here = self._ahead = None
        self._resumed_copy = state.get("kept_pass_weights")  # used by resume_on
