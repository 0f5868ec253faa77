"""The deploy contract: what the learner side writes into an exported policy and the
device side reads back, said once for both.

- the policy format version (the ONNX metadata's ``format_version``) and the versions a
  reader accepts;
- the graph's input and output names;
- the stream options (StreamOptions: the Atari preprocessing and the time feature):
  declared, documented and checked here, and reused from here by the daemon's config
  section (runtime.daemon.config.EnvConfig), the stream factory (runtime.streams), the
  exporter (runtime.daemon.export) and the readers (runtime.device.policy,
  runtime.device.follow). Adding an option is one field below, plus the stream code that
  honours it.

Standard library only: a device imports this without torch, onnx or gymnasium.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import typing
from collections.abc import Callable, Mapping
from typing import Any

POLICY_FORMAT_VERSION = "1"
KNOWN_POLICY_FORMAT_VERSIONS = ("1",)
INPUT_NAME = "observation"
LOGITS = "logits"  # float32 N x A
ACTION = "action"  # int64 N, the greedy argmax
OUTPUTS = (LOGITS, ACTION)

Check = Callable[[Any], str | None]


class StreamError(ValueError):
    """A stream could not be created (bad id, kwargs or options, unsupported spaces); `key`
    names the env setting at fault ("id", "kwargs" or a StreamOptions field)."""

    def __init__(self, message: str, key: str = "id") -> None:
        super().__init__(message)
        self.key = key


def _option(default: Any, doc: str, check: Check) -> Any:
    """A field as runtime.daemon.config reads one (metadata "doc" and "check", the shape
    agent.config.option gives): the import boundary keeps agent and runtime from sharing
    that helper."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


def _got(value: Any, kind: str) -> str:
    return f"must be {kind}, got {type(value).__name__} {value!r}"


def _integer(low: int, high: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return _got(value, "int")
        if high is None:
            return None if value >= low else f"must be >= {low}"
        return None if low <= value <= high else f"must be in [{low}, {high}]"
    return check


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else _got(value, "bool")


def _flag_or_auto(value: Any) -> str | None:
    return None if isinstance(value, bool) or value == "auto" else _got(value, "bool or auto")


def _probability(value: Any) -> str | None:
    # At 1 ALE would repeat the previous action for ever, ignoring the agent's.
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return _got(value, "float")
    return None if 0 <= value < 1 else "must be in [0, 1)"


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """How a stream builds its observations: DQN-style Atari preprocessing (used only for
    ALE env ids) and the time feature (vector streams). Each is checked on construction
    (StreamError naming the option), written into an exported policy's metadata under its
    own name as one JSON value, and read back from it."""

    frame_skip: int = _option(4, "Atari: emulator frames per agent step (max-pool of last "
                              "two).", _integer(1))
    screen_size: int = _option(84, "Atari: frames are resized to screen_size^2 grayscale "
                               "(at most the ALE's 210 rows; larger would only upsample).",
                               _integer(8, 210))
    frame_stack: int = _option(4, "Atari: frames stacked into one observation.", _integer(1))
    noop_max: int = _option(30, "Atari: up to this many no-ops at the start of a game.",
                            _integer(0))
    terminal_on_life_loss: bool = _option(True, "Atari: a lost life ends the episode for "
                                          "learning (statistics still count whole games).",
                                          _flag)
    repeat_action_probability: float = _option(0.0, "Atari: sticky-action probability (0.25 "
                                               "is the modern ALE protocol).", _probability)
    time_feature: bool | str = _option(
        False, "Vector streams: append the elapsed fraction of the episode's time limit "
        "(-0.5 at the start, 0.5 at the limit) to each observation, so the learner knows "
        "how many steps are left. auto = on for float vectors under a time limit; true "
        "refuses a stream without one, or of frames.", _flag_or_auto)

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            problem = check(getattr(self, name))
            if problem is not None:
                raise StreamError(f"{name}: {problem}", name)
            # Kept as the plain Python type: json.dumps takes it (a numpy int it would not)
            # and an int given for a float reads back from the metadata as a float.
            if isinstance(_TYPES[name], type):
                object.__setattr__(self, name, _TYPES[name](getattr(self, name)))

    @classmethod
    def of(cls, settings: Any) -> StreamOptions:
        """The options of anything holding them as attributes (an env config section)."""
        return cls(**{name: getattr(settings, name) for name in OPTION_NAMES})

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props entries: the option's name -> its value as JSON."""
        return {name: json.dumps(getattr(self, name)) for name in OPTION_NAMES}

    @classmethod
    def from_metadata(cls, raw: Mapping[str, str]) -> StreamOptions:
        """Read back what to_metadata wrote: ValueError naming the key at fault (one line)
        for a value that is missing, not JSON, of the wrong type or out of range. An option
        added after format version 1 began reads, when missing, as what policies exported
        before it had."""
        values = {}
        for name, check in _CHECKS.items():
            if name not in raw and name in _BEFORE_IT_EXISTED:
                values[name] = _BEFORE_IT_EXISTED[name]
                continue
            if name not in raw:
                raise ValueError(f"metadata lacks {name}")
            try:
                value = json.loads(raw[name])
            except ValueError:
                raise ValueError(f"metadata {name} {raw[name]!r} is not a JSON value") from None
            problem = check(value)
            if problem is not None:
                raise ValueError(f"metadata {name} {raw[name]!r}: {problem}")
            values[name] = value
        return cls(**values)


_CHECKS: dict[str, Check] = {f.name: f.metadata["check"]
                             for f in dataclasses.fields(StreamOptions)}
_TYPES = typing.get_type_hints(StreamOptions)
OPTION_NAMES = tuple(_CHECKS)
# Options added after policies without them were published: the value those policies meant.
_BEFORE_IT_EXISTED: dict[str, Any] = {"time_feature": False}
# The options every policy's metadata names.
REQUIRED_OPTION_NAMES = tuple(name for name in OPTION_NAMES if name not in _BEFORE_IT_EXISTED)

# gymnasium.make arguments of an ALE env that an option sets (the stream skips frames
# itself; ALE applies the sticky actions): an env's own kwargs must not set them too.
ALE_KWARGS_SET_BY_OPTIONS = {"frameskip": "frame_skip",
                             "repeat_action_probability": "repeat_action_probability"}
