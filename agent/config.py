"""Learner settings, and the small helper every config section uses to declare its fields.

Each field carries a docstring and an optional validity check in its metadata, so the
loader in `runtime.daemon.config` can reject a bad value with a message that names the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], str | None]


def option(default: Any, doc: str, check: Check | None = None) -> Any:
    """A dataclass field with its documentation and an optional check (None = valid)."""
    if isinstance(default, (dict, list)):
        def factory(d: Any = default) -> Any:
            return type(d)(d)
        return dataclasses.field(default_factory=factory, metadata={"doc": doc, "check": check})
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def at_least(low: float, *, allow_none: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None:
            return None if allow_none else "must be set"
        return None if v >= low else f"must be >= {low}"
    return check


def above(low: float, *, allow_none: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None:
            return None if allow_none else "must be set"
        return None if v > low else f"must be > {low}" + (" or null" if allow_none else "")
    return check


def within(low: float, high: float, *, allow_none: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None:
            return None if allow_none else "must be set"
        return None if low <= v <= high else f"must be in [{low}, {high}]"
    return check


def bool_or_auto(v: Any) -> str | None:
    return None if isinstance(v, bool) or v == "auto" else "must be true, false or auto"


def above_or_auto(low: float) -> Check:
    number = above(low)
    return lambda v: None if v == "auto" else (
        number(v) if isinstance(v, (int, float)) else "must be a number or auto")


# ObGD's bounds (policy, value) for `auto`: stream-x's, except on shared-stream, whose many
# weights make the traces' L1 norm (which the bound divides the step by) large, so that
# stream-x's bounds hold its steps back; halved there, kept on the small networks, where
# halving them did harm (the measurements: docs/experiments.md, docs/results.md).
STREAM_X_KAPPAS = (3.0, 2.0)
AUTO_KAPPAS = {"shared-stream": (1.5, 1.0)}


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """How the agent learns: network, optimiser, targets and normalisation."""

    network: str = option(
        "auto", "auto | shared-conv | shared-stream | stream | mlp. auto picks "
        "shared-stream (stream-x's conv layers as one trunk under linear policy and value "
        "heads) for image observations and mlp for vectors, so one config serves every "
        "stream; a resumed run keeps the network it began with. shared-conv: the "
        "notebook's smaller conv trunk; stream: separate stream-x conv towers. 'seed' is "
        "read as shared-conv, its former name.",
        one_of("auto", "shared-conv", "shared-stream", "stream", "mlp", "seed"))
    hidden_size: int = option(256, "Width of the hidden fully connected layers (stream, "
                              "shared-stream, mlp).",
                              at_least(1))
    sparsity: float = option(0.9, "Fraction of each unit's fan-in zeroed by the sparse "
                             "initialisation (stream, mlp). 0 = dense.", within(0.0, 0.99))
    optimizer: str = option("obgd", "obgd (overshooting-bounded steps with eligibility "
                            "traces) | adam (with gradient-norm clipping).", one_of("obgd", "adam"))
    gamma: float = option(0.99, "Discount factor of the TD target.", within(0.0, 1.0))
    # `lambda` is a Python keyword; the YAML key is `lambda`, the attribute `lambda_`.
    lambda_: float = option(0.8, "Eligibility-trace decay. 0 = exactly one-step; with adam "
                            "the traced gradient delta*z is what Adam sees.", within(0.0, 1.0))
    lr: float = option(1.0, "Step size: ObGD's alpha, or Adam's learning rate.", above(0.0))
    kappa_policy: float | str = option(
        "auto", "ObGD overshooting bound for the policy; auto = 1.5 on the shared-stream "
        "network, 3 (stream-x's) on the others.", above_or_auto(0.0))
    kappa_value: float | str = option(
        "auto", "ObGD overshooting bound for the value; auto = 1 on the shared-stream "
        "network, 2 (stream-x's) on the others.", above_or_auto(0.0))
    entropy_coeff: float = option(0.01, "Entropy bonus beta at the start.", at_least(0.0))
    entropy_final: float | None = option(
        None, "Entropy bonus after the decay; null keeps entropy_coeff constant.",
        at_least(0.0, allow_none=True))
    entropy_decay_steps: int = option(1_000_000, "Updates over which beta decays linearly "
                                      "to entropy_final.", at_least(1))
    entropy_floor: float | None = option(
        0.2, "Entropy floor as a fraction of the largest entropy, ln(actions): while the "
        "policy's entropy is below it, beta grows (and shrinks back to the scheduled value "
        "above it), so a policy that turns deterministic too early is pushed back to "
        "explore; null = off.", within(0.0, 1.0, allow_none=True))
    entropy_floor_final: float | None = option(
        # None here, 0.0 in config.yaml: a config written before the schedule existed
        # (every archived run, a user's own file) must go on with the floor it was run with
        None, "The floor after its decay (a fraction of ln(actions), like entropy_floor); "
        "null keeps entropy_floor constant. A floor that gives way once the policy is good "
        "lets it turn more deterministic, which plays better (measured on Breakout: "
        "docs/results.md).",
        within(0.0, 1.0, allow_none=True))
    entropy_floor_decay_start: int = option(
        1_000_000, "Update at which the floor starts its linear decay to "
        "entropy_floor_final.", at_least(0))
    entropy_floor_decay_steps: int = option(
        500_000, "Updates over which the floor decays to entropy_floor_final.", at_least(1))
    entropy_floor_rate: float = option(
        1e-3, "How fast beta adapts to the floor: per update, log(beta / scheduled beta) "
        "moves by rate * (floor - entropy / ln(actions)), kept in [0, ln 100].", above(0.0))
    critic_coeff: float = option(1.0, "Weight of the critic loss c*delta^2 (adam).", above(0.0))
    max_grad_norm: float | None = option(0.5, "Gradient-norm clip for adam; null = none.",
                                         at_least(0.0, allow_none=True))
    adam_eps: float = option(1e-8, "Adam epsilon.", above(0.0))
    td_error_clip: float | None = option(
        None, "adam only: clip the TD error that scales the gradient to [-c, c] (the "
        "derivative of a Huber loss: one surprising transition moves the weights no more "
        "than c would); null = none.", above(0.0, allow_none=True))
    normalize_observations: bool = option(True, "Running per-element mean/variance "
                                          "normalisation of observations.")
    reward_transform: str = option(
        "scale", "scale (divide by the running std of a discounted return trace) | "
        "clip (to [-1, 1]) | none.", one_of("scale", "clip", "none"))
    compile: bool | str = option(
        "auto", "Compile the update with torch.compile (inductor) once per process: auto | "
        "true (compile; without a C++ compiler, or with TORCH_COMPILE_DISABLE=1, run "
        "eagerly and say so in the log) | false (always eager).",
        bool_or_auto)

    def kappas(self, network: str) -> tuple[float, float]:
        """ObGD's bounds (policy, value) on the named network, `auto` resolved."""
        policy, value = AUTO_KAPPAS.get(network, STREAM_X_KAPPAS)
        return (policy if self.kappa_policy == "auto" else float(self.kappa_policy),
                value if self.kappa_value == "auto" else float(self.kappa_value))

    def entropy_at(self, update: int) -> float:
        """The entropy bonus for the given update count (linear decay, then constant)."""
        if self.entropy_final is None:
            return self.entropy_coeff
        frac = min(update / self.entropy_decay_steps, 1.0)
        return self.entropy_coeff + frac * (self.entropy_final - self.entropy_coeff)

    def floor_at(self, update: int) -> float | None:
        """The entropy floor for the given update count (constant, then a linear decay to
        entropy_floor_final, then constant); None when there is no floor."""
        floor = self.entropy_floor
        if floor is None or self.entropy_floor_final is None:
            return floor
        frac = min(max(update - self.entropy_floor_decay_start, 0)
                   / self.entropy_floor_decay_steps, 1.0)
        return floor + frac * (self.entropy_floor_final - floor)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks: (key, message) pairs; empty when consistent."""
        if self.td_error_clip is not None and self.optimizer != "adam":
            return [("td_error_clip", "applies to optimizer adam only (ObGD bounds its "
                     "steps itself); set it to null")]
        return []
