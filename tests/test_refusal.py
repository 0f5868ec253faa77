"""A refused update touches nothing: after a NaN/Inf reward, observation, TD error, gradient
or trace the learner's whole state is what it was, and it goes on exactly as a twin that
never saw the fault (both optimisers, both network layouts)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from agent.config import AgentConfig
from agent.errors import NonFiniteError
from agent.learner import A2CLearner, Transition

# (network, observation shape, actions): a shared trunk on small frames, separate towers.
LAYOUTS = {"shared-conv": ("shared-conv", (4, 32, 32), 4), "mlp": ("mlp", (4,), 2)}
OPTIMIZERS = {"obgd": ("obgd", 0.8, 1.0), "adam": ("adam", 0.0, 1e-3),
              "adam-lambda": ("adam", 0.8, 1e-3)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _observation(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 3:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.normal(size=shape).astype(np.float32)


class Case:
    """A learner after 16 ordinary updates (one episode end among them), the observation
    it stands on, and the source of further observations, all from fixed seeds."""

    def __init__(self, layout: str, optimizer: str, reward_transform: str) -> None:
        network, self.shape, actions = LAYOUTS[layout]
        name, lambda_, lr = OPTIMIZERS[optimizer]
        config = AgentConfig(network=network, hidden_size=16, optimizer=name, lambda_=lambda_,
                             lr=lr, reward_transform=reward_transform, compile=False)
        self.learner = A2CLearner(config, self.shape, actions, seed=3)
        self.rng = np.random.default_rng(5)
        self.obs = _observation(self.rng, self.shape)
        for i in range(16):
            self.ordinary_update(terminated=i == 8)

    def act(self) -> None:
        self.action = self.learner.act(self.obs)

    def update(self, reward: float | None = None, terminated: bool = False,
               next_obs: np.ndarray | None = None) -> dict[str, float]:
        nxt = _observation(self.rng, self.shape) if next_obs is None else next_obs
        reward = float(self.rng.normal()) if reward is None else reward
        metrics = self.learner.update(Transition(self.obs, self.action, reward, nxt,
                                                 terminated, False))
        self.obs = nxt
        return metrics

    def ordinary_update(self, terminated: bool = False) -> dict[str, float]:
        self.act()
        return self.update(terminated=terminated)


def _full_state(learner: A2CLearner) -> dict:
    """The checkpoint's view and the live one: every tensor of the learner's state, the
    observation it stands on and the logits it keeps for it."""
    state = learner.state_dict()
    state["live"] = (learner.state, learner._seen, learner._next_logits)
    return state


def _assert_same(a: object, b: object, where: str = "state") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def _nan_like(obs: np.ndarray) -> np.ndarray:
    bad = obs.copy()
    bad[0] = np.nan
    return bad


def _huge_traces(learner: A2CLearner, which: str) -> None:
    """Traces whose L1 norm (or Adam step) overflows float32 while every element is finite."""
    optimizer = learner.state.optimizer
    field = {"obgd": f"{which}_trace", "adam": "trace"}[learner.config.optimizer]
    huge = torch.full_like(getattr(optimizer, field), 1e37)
    learner.state = learner.state._replace(optimizer=optimizer._replace(**{field: huge}))


# fault name -> (reward transform, applies to (layout, optimizer)?, setup, faulty call)
Fault = tuple[str, Callable[[str, str], bool], Callable[[Case], None], Callable[[Case], object]]
FAULTS: dict[str, Fault] = {
    "NaN reward": ("scale", lambda lay, opt: True, lambda c: None,
                   lambda c: c.update(reward=float("nan"))),
    "Inf reward": ("clip", lambda lay, opt: True, lambda c: None,
                   lambda c: c.update(reward=float("inf"))),
    "reward overflowing the reward statistics": (
        "scale", lambda lay, opt: True, lambda c: None,
        lambda c: c.update(reward=1e300)),
    "NaN next observation": (
        "scale", lambda lay, opt: lay == "mlp", lambda c: None,
        lambda c: c.update(next_obs=_nan_like(c.obs))),
    "NaN observation to act on": (
        "scale", lambda lay, opt: lay == "mlp", lambda c: None,
        lambda c: c.learner.act(_nan_like(c.obs))),
    "TD error overflowing float32 after s' joined the statistics": (
        "none", lambda lay, opt: True, lambda c: None,
        lambda c: c.update(reward=1e300)),
    "gradient overflowing float32": (
        "none", lambda lay, opt: opt != "obgd", lambda c: None,
        lambda c: c.update(reward=3e38)),
    "policy trace overflowing": (
        "scale", lambda lay, opt: opt != "adam", lambda c: _huge_traces(c.learner, "policy"),
        lambda c: c.update()),
    "value trace overflowing after the policy side was ready to step": (
        "scale", lambda lay, opt: opt == "obgd", lambda c: _huge_traces(c.learner, "value"),
        lambda c: c.update()),
}
CASES = [pytest.param(layout, optimizer, fault, id=f"{layout}-{optimizer}-{fault}")
         for layout in LAYOUTS for optimizer in OPTIMIZERS for fault, spec in FAULTS.items()
         if spec[1](layout, optimizer)]
@pytest.mark.parametrize(("layout", "optimizer", "fault"), CASES)
def test_a_refused_update_leaves_the_whole_state_as_it_was(layout: str, optimizer: str,
                                                           fault: str) -> None:
    transform, _, setup, call = FAULTS[fault]
    faulty, twin = (Case(layout, optimizer, transform) for _ in range(2))
    for case in (faulty, twin):
        setup(case)
        case.act()  # the action is taken; the update on it is what gets refused
    before = _full_state(faulty.learner)
    with pytest.raises(NonFiniteError):
        call(faulty)
    after = _full_state(faulty.learner)
    _assert_same(after, before)
    _assert_same(after, _full_state(twin.learner))
    # ... and it goes on exactly as the twin that never saw the fault.
    outcomes = []
    for case in (faulty, twin):
        case.rng = np.random.default_rng(9)
        try:
            outcomes.append(case.ordinary_update())
        except NonFiniteError as exc:  # a huge trace refuses the next update as well
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    _assert_same(_full_state(faulty.learner), _full_state(twin.learner))


def test_every_fault_kind_is_exercised_on_both_layouts_and_all_optimisers() -> None:
    covered = {(layout, optimizer) for layout, optimizer, _ in (c.values for c in CASES)}
    assert covered == {(lay, opt) for lay in LAYOUTS for opt in OPTIMIZERS}
    assert len(CASES) >= 35


def test_a_refused_update_was_really_about_to_change_the_state() -> None:
    """The faults above reach the step: without the checks the same update would move the
    statistics and the weights (so the comparisons are not vacuous)."""
    case = Case("mlp", "obgd", "none")
    count = int(case.learner.state.observations.count)
    weights = case.learner.state.params
    case.act()
    case.update(reward=1e30)  # finite TD error: taken
    assert int(case.learner.state.observations.count) == count + 1
    assert not torch.equal(case.learner.state.params, weights)
    case.act()
    with pytest.raises(NonFiniteError):
        case.update(reward=1e300)
    assert int(case.learner.state.observations.count) == count + 1
