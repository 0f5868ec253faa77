"""What a policy does: how often it takes each action and how sure it is, over whole games.

    python tools/research/policy_probe.py MODEL.onnx [MODEL.onnx ...] [--games 5]
        [--max-steps N] [--seed 0] [--greedy]

Plays an exported policy on the stream it was trained on (rebuilt from the model's
metadata, as a device does), sampling each action from softmax(logits) as the learner acts
(`--greedy`: the argmax, as a device plays). Prints, for each action by name, the share of
steps it was taken and its mean probability; the policy's entropy as a fraction of
ln(actions), its mean and percentiles over the steps; how much of the mean policy's entropy
the observation decides (the mutual information of observation and action, the same
fraction); and the returns of the whole games. A policy that learned to choose has a low
entropy per step and a high mutual information (Breakout's: left or right by where the
ball is); one that settled on a single action whatever it sees (a local optimum such as
firing from one corner) has both low. Several models (a run's policies, published every
50k steps; `--set export.keep=N` keeps more of them) print one row each, by training step:
when a policy settled, and on what. Torch-free: numpy and onnxruntime.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import OneLineParser, UsageError, positive_int
from runtime.device.play import check_fits, make_stream_from_metadata
from runtime.device.policy import ModelError, Policy
from runtime.streams import StreamError

PERCENTILES = (10, 50, 90)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Action probabilities of one row of logits, in float64."""
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return shifted / shifted.sum()


def entropy_fraction(probs: np.ndarray) -> float:
    """The entropy of a distribution as a fraction of the uniform one's, ln(len(probs))."""
    nonzero = probs[probs > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / math.log(len(probs)))


@dataclass(frozen=True)
class Profile:
    """What a policy did over a probe: per action, per step and per whole game."""

    meanings: tuple[str, ...]
    taken: np.ndarray  # share of the steps each action was taken
    mean_probability: np.ndarray  # each action's probability, averaged over the steps
    entropy_fractions: np.ndarray  # per step
    returns: list[float]  # of the whole games played

    @property
    def mutual_information(self) -> float:
        """I(observation; action) as a fraction of ln(actions): the mean policy's entropy
        less the mean entropy per step."""
        return entropy_fraction(self.mean_probability) - float(self.entropy_fractions.mean())

    def row(self) -> str:
        """One line: entropy, mutual information, the most taken action, mean return."""
        top = int(np.argmax(self.taken))
        mean = f"{np.mean(self.returns):9.2f}" if self.returns else f"{'-':>9}"
        return (f"{self.entropy_fractions.mean():7.3f}  {self.mutual_information:6.3f}  "
                f"{self.meanings[top]:>14} {self.taken[top]:5.3f}  {mean}")

    def lines(self) -> list[str]:
        width = max(len("action"), *(len(m) for m in self.meanings))
        rows = [f"{'action':<{width}}  taken  mean probability"]
        rows += [f"{meaning:<{width}}  {taken:5.3f}  {prob:5.3f}" for meaning, taken, prob
                 in zip(self.meanings, self.taken, self.mean_probability,
                                         strict=True)]
        cuts = np.percentile(self.entropy_fractions, PERCENTILES)
        rows.append(f"entropy / ln({len(self.meanings)}): mean "
                    f"{self.entropy_fractions.mean():.3f}, "
                    + ", ".join(f"p{q} {c:.3f}" for q, c in zip(PERCENTILES, cuts, strict=True))
                    + f" over {len(self.entropy_fractions)} steps")
        rows.append(f"decided by the observation (mutual information / ln({len(self.meanings)})):"
                    f" {self.mutual_information:.3f}")
        mean = f"mean {np.mean(self.returns):.2f}" if self.returns else "no whole game"
        rows.append(f"returns of {len(self.returns)} whole games: {mean} "
                    f"{[round(r, 2) for r in self.returns]}")
        return rows


def probe(policy: Policy, stream: Any, games: int, max_steps: int | None,
          greedy: bool, rng: np.random.Generator) -> Profile:
    """Play until `games` whole games end (info["game_over"]) or `max_steps` steps."""
    check_fits(policy, stream.spec)
    actions = policy.num_actions
    counts, prob_sums, fractions, returns = np.zeros(actions), np.zeros(actions), [], []
    game_return, obs = 0.0, stream.reset()
    while len(returns) < games and (max_steps is None or len(fractions) < max_steps):
        probs = softmax(policy.logits(obs[None])[0])
        action = int(np.argmax(probs)) if greedy else int(rng.choice(actions, p=probs))
        counts[action] += 1
        prob_sums += probs
        fractions.append(entropy_fraction(probs))
        obs, reward, terminated, truncated, info = stream.step(action)
        game_return += float(reward)
        if info.get("game_over", terminated or truncated):
            returns.append(game_return)
            game_return = 0.0
        if terminated or truncated:
            obs = stream.reset()
    steps = max(len(fractions), 1)
    return Profile(tuple(stream.spec.action_meanings), counts / steps, prob_sums / steps,
                   np.asarray(fractions), returns)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="policy_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+", metavar="model",
                        help="exported policies (.onnx)")
    parser.add_argument("--games", type=positive_int, default=5,
                        help="whole games to play (default 5)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many steps even inside a game")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the stream and the sampled actions (default 0)")
    parser.add_argument("--greedy", action="store_true",
                        help="take the most probable action, as a device plays")
    return parser.parse_args(argv)


def probe_model(path: Path, args: argparse.Namespace) -> tuple[Policy, Profile]:
    policy = Policy.load(path)
    stream = make_stream_from_metadata(policy.metadata, seed=args.seed)
    try:
        return policy, probe(policy, stream, args.games, args.max_steps, args.greedy,
                             np.random.default_rng(args.seed))
    finally:
        stream.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        actions = "greedy" if args.greedy else "sampled"
        if len(args.models) == 1:
            policy, profile = probe_model(args.models[0], args)
            print(f"{args.models[0]} on {policy.metadata['env_id']}, {actions} actions")
            print("\n".join(profile.lines()))
            return 0
        print(f"{actions} actions; entropy and mutual information as fractions of "
              f"ln(actions)\n{'step':>9}  entropy  mutual  {'most taken':>14} share  "
              f"{'return':>9}  stream, model")
        probed = [probe_model(path, args) for path in args.models]
        for policy, profile in sorted(probed, key=lambda p: (p[0].metadata["env_id"],
                                                             p[0].metadata["training_step"])):
            print(f"{policy.metadata['training_step']:>9}  {profile.row()}  "
                  f"{policy.metadata['env_id']}, {Path(policy.path).name}")
    except (UsageError, ModelError, StreamError) as exc:
        print(f"policy_probe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
