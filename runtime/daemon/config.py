"""The one config object: nested frozen dataclasses loaded once from YAML and validated.

Every error names the dotted key and the problem in one line (ConfigError), before
anything starts. `--set a.b=value` overrides go through the same validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentConfig, at_least, option, within
from runtime.contract import ALE_KWARGS_SET_BY_OPTIONS, StreamOptions


class ConfigError(ValueError):
    """A config problem; str() is a one-line message naming the key."""


@dataclasses.dataclass(frozen=True)
class _EnvSource:
    id: str = option("ALE/Breakout-v5", "Gymnasium environment id.")
    kwargs: dict = option({}, "Keyword arguments passed to gymnasium.make.")


# Dataclasses gather fields from the last base first: id and kwargs, then the options, the
# order config.yaml lists them in (and the resolved config a run writes).
@dataclasses.dataclass(frozen=True)
class EnvConfig(StreamOptions, _EnvSource):
    """The sensor stream: an environment id, its gymnasium.make arguments and the stream
    options (Atari preprocessing, the time feature), which are declared, documented and
    checked once in runtime.contract.StreamOptions (the exporter and the device read them
    from there too)."""

    def problems(self) -> list[tuple[str, str]]:
        """Keyword arguments that would fight the stream's own settings."""
        for kwarg, setting in ALE_KWARGS_SET_BY_OPTIONS.items():
            if kwarg in self.kwargs:
                return [("kwargs", f"{kwarg}: set env.{setting} instead")]
        if self.kwargs.get("render_mode") not in (None, "rgb_array"):
            return [("kwargs", f"render_mode {self.kwargs['render_mode']!r}: the daemon is "
                               f"headless (rgb_array or none)")]
        return []


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how many checkpoints are written under RUN_DIR/checkpoints/."""

    every_steps: int | None = option(50_000, "Write a checkpoint every N agent steps; null = "
                                     "only by time.", at_least(1, allow_none=True))
    every_seconds: float | None = option(600.0, "Write a checkpoint every N seconds; null = "
                                         "only by steps.", at_least(1, allow_none=True))
    keep: int = option(3, "How many of the newest checkpoints to keep.", at_least(1))

    def problems(self) -> list[tuple[str, str]]:
        if self.every_steps is None and self.every_seconds is None:
            return [("every_steps", "null together with checkpoint.every_seconds: nothing "
                                    "would be saved until the daemon stops; set one of them")]
        return []


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run as a whole."""

    max_steps: int | None = option(None, "Stop at this all-time step count; null = forever.",
                                   at_least(0, allow_none=True))
    dir: str = option("runs/default", "Run directory (metrics, status, checkpoints).")
    torch_threads: int = option(1, "torch intra-op threads; one update is too small to "
                                "split, so 1 is fastest.", at_least(1))
    onednn: str = option("auto", "auto | on | off: oneDNN (mkldnn) convolutions. auto = off "
                         "for the stream and shared-stream networks, whose small "
                         "convolutions run faster on torch's own kernels "
                         "(docs/performance.md), on otherwise.",
                         lambda v: None if v in ("auto", "on", "off")
                         else "must be one of auto, on, off")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Logging and metrics."""

    level: str = option("INFO", "Python logging level.",
                        lambda v: None if v in ("DEBUG", "INFO", "WARNING", "ERROR")
                        else "must be DEBUG, INFO, WARNING or ERROR")
    summary_every_seconds: float = option(60.0, "Interval of summary log lines.", at_least(1))
    status_every_seconds: float = option(5.0, "Interval of status.json rewrites.", at_least(0.1))
    video_every_games: int = option(0, "Record the game after every Nth finished game as "
                                    "MP4 under RUN_DIR/videos/; 0 = off.", at_least(0))
    tensorboard: bool = option(False, "Also write per-game scalars for TensorBoard under "
                               "RUN_DIR/tensorboard/ (needs the tensorboard package).")
    metrics_port: int | None = option(None, "Serve Prometheus metrics at /metrics and a "
                                      "health check at /healthz on this TCP port; null = "
                                      "off.", lambda v: None if v is None or 1 <= v <= 65535
                                      else "must be in 1..65535 or null")
    metrics_address: str = option("127.0.0.1", "The address metrics_port listens on "
                                  "(0.0.0.0: every interface, for a scraper on another "
                                  "host).")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Verified ONNX policies published under RUN_DIR/policies/ while the daemon learns
    (runtime.daemon.publish), for devices that follow them (python -m runtime.infer
    --follow). Both intervals null = publishing off."""

    every_steps: int | None = option(50_000, "Publish a policy every N agent steps; null = "
                                     "only by time.", at_least(1, allow_none=True))
    every_seconds: float | None = option(None, "Publish a policy every N seconds; null = "
                                         "only by steps.", at_least(1, allow_none=True))
    keep: int = option(5, "How many of the newest policies (files and manifest entries) "
                       "to keep.", at_least(1))
    key_file: str | None = option(None, "Key file that signs each manifest entry: an "
                                  "Ed25519 private key, NAME.key of `python -m runtime.keys "
                                  "new NAME` (recommended: devices hold only NAME.pub and "
                                  "cannot sign), or a shared HMAC-SHA256 secret file (standard "
                                  "library only; every device holds what signs); null = "
                                  "unsigned.")
    timeout_seconds: float = option(600.0, "An export still running after this long is "
                                    "stopped and counted as failed.", at_least(1))
    on_stop: bool = option(True, "At a clean stop, publish the policy of the last step "
                           "(unless published already), waiting up to 30 s for it.")
    niceness: int = option(10, "CPU niceness added to the publisher process (0-19): when "
                           "the CPU is short the learner comes first and policies come later.",
                           lambda v: None if 0 <= v <= 19 else "must be in 0..19")


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """What the daemon does when something goes wrong while it runs."""

    on_nonfinite: str = option(
        "skip", "A NaN/Inf TD error, gradient or trace: skip that update, or rollback the "
        "learner to the last good checkpoint.", lambda v: None if v in ("skip", "rollback")
        else "must be one of skip, rollback")
    stream_max_failures: int = option(5, "Consecutive stream failures (raising in reset or "
                                      "step) before the daemon checkpoints and exits 3.",
                                      at_least(1))
    stream_backoff_seconds: float = option(1.0, "First wait before recreating a failed "
                                           "stream; doubles per consecutive failure.",
                                           at_least(0.0))
    stream_backoff_max_seconds: float = option(60.0, "Longest wait between stream "
                                               "recreation attempts.", at_least(0.0))

    def problems(self) -> list[tuple[str, str]]:
        if self.stream_backoff_max_seconds < self.stream_backoff_seconds:
            return [("stream_backoff_max_seconds", f"must be >= faults.stream_backoff_seconds "
                                                   f"({self.stream_backoff_seconds})")]
        return []


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    agent: AgentConfig = dataclasses.field(default_factory=AgentConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    seed: int = option(0, "Seed of the network initialisation, the actions and the stream.",
                       within(0, 2**32 - 1))

    def on_network(self, network: str) -> Config:
        """This config with `agent.network` set to the network a checkpoint's weights
        belong to (its spec names it), which `auto` may no longer pick."""
        return dataclasses.replace(self, agent=dataclasses.replace(self.agent, network=network))



def _yaml_name(field: dataclasses.Field) -> str:
    return field.name.rstrip("_")  # lambda_ -> lambda


def _type_problem(value: Any, annotation: Any) -> str | None:
    """None if value fits the annotation, else a description of the expected type."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) \
        else (annotation,)
    for expected in options:
        if expected is type(None) and value is None:
            return None
        if expected is bool and isinstance(value, bool):
            return None
        if expected is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if expected in (str, dict) and isinstance(value, expected):
            return None
    names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
    return f"must be {names}, got {type(value).__name__} {value!r}"


def _yaml_scalar(value: Any, annotation: Any) -> Any:
    """Take a scalar as the user meant it where YAML 1.1 reads it as another type:
    PyYAML reads `1e-4` (no dot) as a string, and `on`/`off` (run.onednn's words) as
    booleans."""
    if isinstance(value, str) and annotation in (float, float | None, float | str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, bool) and annotation is str:
        return "on" if value else "off"
    return value


# Keys that were renamed (old -> new). A user's config with an old key is refused with
# the new name; a config stored in an older checkpoint is read with the new one.
RENAMED = {"log.video_every_episodes": "log.video_every_games"}
# Keys that were removed, with what replaced them. A user's config naming one is refused
# with that line; a config stored in an older checkpoint is read without it.
_STEPS_IN_TURN = ("removed: the stream steps between two compiled updates, which "
                  "measured faster than stepping it during them; delete the key")
REMOVED = {"agent.reuse_next_pass": "removed: the learner's update is one pure function "
                                    "that makes its own passes (agent.compile sets how it "
                                    "runs); delete the key",
           "run.overlap_stream": _STEPS_IN_TURN,
           "run.stream_process": _STEPS_IN_TURN}
_WHY_RENAMED = {"log.video_every_games": "a game is all its lives; an episode ends with "
                                         "each life when env.terminal_on_life_loss is true"}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_name(f): f for f in dataclasses.fields(cls)}
    for key in data:
        if f"{prefix}{key}" in REMOVED:
            raise ConfigError(f"{prefix}{key}: {REMOVED[prefix + key]}")
        if f"{prefix}{key}" in RENAMED:
            new = RENAMED[prefix + key]
            raise ConfigError(f"{prefix}{key}: renamed to {new} ({_WHY_RENAMED[new]})")
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        if name not in data:
            continue
        annotation, value = hints[field.name], _yaml_scalar(data[name], hints[field.name])
        if dataclasses.is_dataclass(annotation):
            values[field.name] = _build(annotation, value, f"{prefix}{name}.")
            continue
        problem = _type_problem(value, annotation)
        check = field.metadata.get("check")
        if problem is None and check is not None:
            problem = check(value)
        if problem is not None:
            raise ConfigError(f"{prefix}{name}: {problem}")
        if annotation in (float, float | None, float | str) and isinstance(value, int):
            value = float(value)
        values[field.name] = value
    built = cls(**values)
    for key, problem in getattr(built, "problems", lambda: [])():
        raise ConfigError(f"{prefix}{key}: {problem}")
    return built


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) to a raw config mapping."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config {path}: YAML syntax error{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return _build(Config, data, "")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data with YAML key names (for logs, run dirs and checkpoints)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[_yaml_name(field)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated Config from `to_dict` output (e.g. stored in a checkpoint, maybe
    by an older version with keys since renamed)."""
    data = {section: dict(values) if isinstance(values, dict) else values
            for section, values in data.items()}
    for old, new in RENAMED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = data.get(old_section)
        if isinstance(section, dict) and old_key in section:
            data.setdefault(new_section, {})[new_key] = section.pop(old_key)
    for old in REMOVED:
        section_name, key = old.split(".")
        section = data.get(section_name)
        if isinstance(section, dict):
            section.pop(key, None)
    return _build(Config, data, "")
