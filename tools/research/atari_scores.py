"""Human-normalised Atari scores: (score - random) / (human - random).

The random and human references are the standard Atari-57 table: random-agent scores from
Mnih et al. 2015 ("Human-level control through deep reinforcement learning", Nature 518)
and human scores as tabulated by Wang et al. 2016 ("Dueling network architectures", ICML)
and Badia et al. 2020 ("Agent57", ICML). The same figures serve the Atari 100k literature
and DreamerV3's baselines, so normalised scores here compare with theirs.
"""

from __future__ import annotations

import math
import re

# game -> (random, human); only the games this project reports on
REFERENCES: dict[str, tuple[float, float]] = {
    "Breakout": (1.7, 30.5),
    "Pong": (-20.7, 14.6),
    "SpaceInvaders": (148.0, 1668.7),
    "Seaquest": (68.4, 42054.7),
}


def game_name(env_id: str) -> str:
    """The game of a Gymnasium Atari id: ALE/Pong-v5, PongNoFrameskip-v4 -> Pong."""
    name = env_id.rpartition("/")[2]
    return re.sub(r"(NoFrameskip|Deterministic)?-v\d+$", "", name)


def human_normalised(env_id: str, score: float) -> float:
    """The score as a fraction of the way from random to human play; NaN for a stream
    without references (a control task, an Atari game this table leaves out)."""
    references = REFERENCES.get(game_name(env_id))
    if references is None or not math.isfinite(score):
        return math.nan
    random, human = references
    return (score - random) / (human - random)
