"""A policy that follows a learner's published policies (no torch).

    follower = Follower("http://learner:8000/", key_file="policy.key")
    follower.start()                      # the first policy, or FollowError
    while running:
        observation, done = env.reset(), False
        while not done:
            observation, reward, done = env.step(follower.act(observation))
        follower.reload()                 # between games: a newer verified policy, if any

A background thread reads `latest.json` every `interval` seconds. When it names a policy
newer than the one playing, the thread checks the entry (runtime.manifest: file name,
size bound, signature with a key), downloads the file to a temporary file in the cache
directory, checks its size and SHA-256, loads it (format version, metadata), checks that
it plays the same stream as the current policy, and runs one forward pass on a real
observation. Only a policy that passes everything is offered; `reload()` swaps to it
between games. Anything bad is one log line and the current policy keeps playing: a
refused policy is remembered (and not fetched again), a source that is down or slow is
logged when it goes down and when it comes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contract import OPTION_NAMES
from runtime.files import write_atomic
from runtime.infer import ModelError, Policy
from runtime.manifest import (
    Entry,
    ManifestError,
    load_key,
    parse_entry,
    parse_index,
    sha256_file,
)
from runtime.sources import Source, SourceError

log = logging.getLogger("runtime.follow")

DEFAULT_MAX_POLICY_BYTES = 64 << 20
# What makes two policies play the same stream (the metadata runtime.infer rebuilds it from).
STREAM_KEYS = ("env_id", "observation_shape", "observation_dtype", "num_actions",
               *OPTION_NAMES, "env_kwargs")
CURRENT = "current.json"
MAX_REMEMBERED = 1000  # refusals remembered (memory stays bounded whatever is published)


class FollowError(Exception):
    """No policy could be obtained to start with; one line."""


class Refused(Exception):
    """A published policy that must not be played; one line. `retry`: the same entry may
    be fetched again later (its file did not match its checksum: a corrupt transfer or a
    file being replaced); otherwise it is never fetched again."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


@dataclass
class Candidate:
    entry: Entry
    policy: Policy


def default_cache_dir(source: Source) -> Path:
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return Path("~/.cache/stream-agent/follow").expanduser() / digest


class Follower:
    """act(observation) with the newest verified policy; reload() between games."""

    def __init__(self, source: Source | str, *, key_file: str | Path | None = None,
                 cache_dir: str | Path | None = None, interval: float = 30.0,
                 max_policy_bytes: int = DEFAULT_MAX_POLICY_BYTES,
                 download_seconds: float = 300.0, threads: int = 1) -> None:
        """`source`: a policies directory or its http(s) URL (ValueError if neither);
        `key_file`: the learner's shared key, required on every entry when given
        (KeyFileError if unreadable); `cache_dir`: where verified policies are kept."""
        self.source = source if isinstance(source, Source) else Source(source)
        self.key = load_key(key_file) if key_file is not None else None
        self.cache = Path(cache_dir) if cache_dir is not None else \
            default_cache_dir(self.source)
        self.interval = interval
        self.max_policy_bytes = max_policy_bytes
        self.download_seconds = download_seconds
        self.threads = threads
        self.current: Candidate | None = None
        self.played: list[int] = []          # the steps of the policies played, in order
        self.refused: list[dict[str, Any]] = []
        self.source_errors = 0
        self._refused_keys: set[tuple] = set()
        self._reported: set[tuple] = set()
        self._ready: Candidate | None = None
        self._down: str | None = None        # the source's last error while it is down
        self._probe: np.ndarray | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the policy interface ------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self.current.policy

    @property
    def step(self) -> int:
        return self.current.entry.step

    # The current policy's own attributes, so a Follower plays wherever a Policy does.
    @property
    def path(self) -> str:
        return self.current.policy.path

    @property
    def metadata(self) -> dict[str, Any]:
        return self.current.policy.metadata

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return self.current.policy.observation_shape

    @property
    def observation_dtype(self) -> np.dtype:
        return self.current.policy.observation_dtype

    @property
    def num_actions(self) -> int:
        return self.current.policy.num_actions

    def act(self, observation: np.ndarray, sample: bool = False,
            rng: np.random.Generator | None = None) -> int:
        self._probe = observation  # a real observation for the next candidate's check
        return self.current.policy.act(observation, sample=sample, rng=rng)

    def start(self, wait: float = 0.0) -> Policy:
        """The first policy: from the source, else from the cache. With `wait` > 0 the
        source is asked again (every `interval` seconds, at most 1 s) for up to `wait`
        seconds: a device may boot before the learner has published anything. Then the
        background checks begin. Raises FollowError (one line) when there is none."""
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FollowError(f"cache directory {self.cache}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + wait
        while True:
            first, problem = self._first()
            if first is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise FollowError(problem)
            time.sleep(min(self.interval, 1.0, left))
        self._swap(first)
        self._thread = threading.Thread(target=self._watch, name="follow", daemon=True)
        self._thread.start()
        return first.policy

    def _first(self) -> tuple[Candidate | None, str]:
        """(the first policy, or None and why not)."""
        try:
            first = self.check(announce=False)  # a failure here is the one error line
        except SourceError as exc:
            cached = self._cached()
            if cached is None:
                return None, f"no policy could be obtained: {exc}"
            log.warning("source unreachable (%s): playing the cached policy step %d",
                        exc, cached.entry.step)
            return cached, ""
        if first is None:
            reason = self.refused[-1]["reason"] if self.refused else "nothing published"
            return None, f"no usable policy in {self.source}: {reason}"
        return first, ""

    def reload(self) -> bool:
        """Swap to the newest verified policy, if one is waiting; call between games."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None or ready.entry.step <= self.step:
            return False
        self._swap(ready)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.source.timeout + 5)

    def summary(self) -> dict[str, Any]:
        return {"source": str(self.source), "policy_step": self.step,
                "policies_played": list(self.played), "refused": list(self.refused),
                "source_errors": self.source_errors}

    # -- checking a published policy ---------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                candidate = self.check()
            except SourceError:
                continue  # logged by check; the current policy keeps playing
            except Exception as exc:  # noqa: BLE001 - following must outlive any surprise
                log.warning("policy check failed (%s: %s); the current policy keeps playing",
                            type(exc).__name__, exc)
                continue
            if candidate is not None:
                with self._lock:
                    self._ready = candidate

    def _newest_known(self) -> int:
        ready = self._ready
        steps = [c.entry.step for c in (self.current, ready) if c is not None]
        return max(steps) if steps else -1

    def check(self, announce: bool = True) -> Candidate | None:
        """One look at latest.json: a verified newer policy, or None (nothing newer, or
        refused). SourceError when the source cannot be read (logged once per outage).
        Problems are logged, one line each, unless `announce` is False."""
        warn = log.warning if announce else log.debug
        try:
            raw = self.source.read_index()
            data = parse_index(raw)
        except (SourceError, ManifestError) as exc:
            self.source_errors += 1
            if self._down != str(exc):
                warn("source problem, the current policy keeps playing: %s", exc)
            self._down = str(exc)
            raise SourceError(str(exc)) from None
        if self._down is not None:
            log.info("source %s answers again", self.source)
            self._down = None
        step = data.get("step") if isinstance(data, dict) else None
        if isinstance(step, int) and step <= self._newest_known():
            return None
        key = (step, data.get("sha256"), data.get("signature")) if isinstance(data, dict) \
            else (None, raw)
        if key in self._refused_keys:
            return None
        try:
            return self._verify(data)
        except (SourceError, OSError) as exc:  # a transfer or disk problem: try again later
            self.source_errors += 1
            warn("policy step %s not fetched (%s); retrying later", step, exc)
            return None
        except Refused as exc:
            if len(self._reported) >= MAX_REMEMBERED:  # a source that publishes junk forever
                self._reported.clear()
                self._refused_keys.clear()
                del self.refused[:-MAX_REMEMBERED // 10]
            if not exc.retry:
                self._refused_keys.add(key)
            if (key, str(exc)) not in self._reported:  # one record and line per refusal
                self._reported.add((key, str(exc)))
                name = data.get("file") if isinstance(data, dict) else None
                self.refused.append({"step": step, "file": name, "reason": str(exc)})
                warn("refused policy step %s: %s", step, exc)
            return None

    def _verify(self, data: Any) -> Candidate:
        try:
            entry = parse_entry(data, self.key, self.max_policy_bytes)
        except ManifestError as exc:
            raise Refused(str(exc)) from None
        if self.current is not None and entry.env_id != self.current.entry.env_id:
            raise Refused(f"made for {entry.env_id}, this device plays "
                          f"{self.current.entry.env_id}")
        tmp = self.cache / f".download-{entry.file}"
        try:
            self.source.download(entry.file, tmp, entry.size, self.download_seconds)
            digest = sha256_file(tmp)
            if digest != entry.sha256:
                raise Refused(f"sha256 {digest[:16]}... does not match the manifest's "
                              f"{entry.sha256[:16]}...", retry=True)
            policy = self._load(tmp, entry)
            final = self.cache / entry.file
            tmp.replace(final)
            policy.path = str(final)
        finally:
            tmp.unlink(missing_ok=True)
        return Candidate(entry, policy)

    def _load(self, path: Path, entry: Entry) -> Policy:
        try:
            policy = Policy.load(path, threads=self.threads)
        except ModelError as exc:
            raise Refused(str(exc).replace(str(path), entry.file)) from None
        meta = policy.metadata
        if meta["training_step"] != entry.step or meta["env_id"] != entry.env_id:
            raise Refused(f"the model says step {meta['training_step']} of "
                          f"{meta['env_id']}, the manifest step {entry.step} of {entry.env_id}")
        if self.current is not None:
            ours = self.current.policy.metadata
            for key in STREAM_KEYS:
                if meta[key] != ours[key]:
                    raise Refused(f"made for another stream: {key} is {meta[key]!r} there, "
                                  f"{ours[key]!r} here")
        probe = self._probe
        observation = np.zeros(policy.observation_shape, policy.observation_dtype) \
            if probe is None else np.array(probe, dtype=policy.observation_dtype)
        try:
            logits = policy.logits(observation[None])
            action = policy.act(observation)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
            raise Refused(f"forward pass failed ({type(exc).__name__})") from None
        if not np.isfinite(logits).all() or not 0 <= action < policy.num_actions:
            raise Refused("forward pass gives non-finite logits or an action out of range")
        return policy

    # -- the cache -----------------------------------------------------------------------------

    def _swap(self, candidate: Candidate) -> None:
        previous, self.current = self.current, candidate
        self.played.append(candidate.entry.step)
        try:  # what a restart plays while the source is down
            write_atomic(self.cache / CURRENT, json.dumps(candidate.entry.fields).encode())
            for old in self.cache.glob("policy-*.onnx"):
                if old.name < candidate.entry.file:  # names sort by step; newer may be ready
                    old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cache %s not updated (%s)", self.cache, exc.strerror or exc)
        log.info("playing policy step %d (%s%s)", candidate.entry.step, candidate.entry.file,
                 f", was step {previous.entry.step}" if previous else "")

    def _cached(self) -> Candidate | None:
        """The policy last played from this cache, checked again as if just downloaded."""
        try:
            data = json.loads((self.cache / CURRENT).read_bytes())
            entry = parse_entry(data, self.key, self.max_policy_bytes)
            path = self.cache / entry.file
            if sha256_file(path) != entry.sha256:
                return None
            return Candidate(entry, self._load(path, entry))
        except (OSError, ValueError, Refused):
            return None
