"""A policy that follows a learner's published policies (no torch).

    follower = Follower("http://learner:8000/", key_file="fleet.pub")
    follower.start()                      # the first policy, or FollowError
    while running:
        observation, done = env.reset(), False
        while not done:
            observation, reward, done = env.step(follower.act(observation))
        follower.reload()                 # between games: a newer verified policy, if any

A device starts from what it trusts: `start()` checks the policy in its cache again (the
last one it played: entry, signature, SHA-256, model), then looks at the source once; a
newer policy there that passes every check plays, else the cached one does, whatever the
source says (down, forged, corrupt, slow, oversized, older: one log line names what was
refused). Only when neither exists is it FollowError.

Never backwards, unless the learner says so: the cache's `accepted.json`
(runtime.device.manifest `Accepted`, replaced atomically at every swap) keeps, across
restarts, each run the device followed with the highest step it accepted of it. With a key
a policy plays only if it is newer in the run followed (a higher step; a rollback the
learner signed: a higher sequence), or the first of a newer run that names itself; a run
the device left never comes back. Without a key only steps count (a new run waits until it
passes the old step).

A background thread (a daemon thread) then reads `latest.json` every `interval` seconds.
When it names another policy than the one playing, the thread checks the entry
(runtime.device.manifest: file name, size bound, signature with keys, newer than what this
device accepted), downloads the file to a temporary file in the cache directory within a
total deadline, checks its size and SHA-256, loads it (format version, metadata), checks
that it plays the same stream as the current policy, and runs one forward pass on a real
observation. Only a policy that passes everything is offered; `reload()` swaps to it
between games. Anything bad is one log line and the current policy keeps playing: a refused
policy is remembered (and not fetched again), a source that is down or slow, or a download
that fails, is logged when the condition starts and when it ends, not at every look. A
partial download never stays in the cache; `close()` ends a download in progress at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contract import OPTION_NAMES
from runtime.device.keys import TrustedKeys, signed_by
from runtime.device.manifest import (
    ACCEPTED,
    Accepted,
    Entry,
    ManifestError,
    parse_entry,
    parse_index,
    run_label,
    sha256_file,
)
from runtime.device.policy import ModelError, Policy
from runtime.device.sources import Source, SourceError
from runtime.files import write_atomic

# Named for what it logs, not where the module lives: logging configurations and log
# filters select it by this name.
log = logging.getLogger("runtime.follow")

DEFAULT_MAX_POLICY_BYTES = 64 << 20
# What makes two policies play the same stream (the metadata runtime.device.play rebuilds
# it from).
STREAM_KEYS = ("env_id", "observation_shape", "observation_dtype", "num_actions",
               *OPTION_NAMES, "env_kwargs")
CURRENT = "current.json"
PARTIAL = ".download-"  # the prefix of a download in progress in the cache
CLOSE_SECONDS = 2.0  # close() waits this long at most for the watcher
MAX_REMEMBERED = 1000  # refusals remembered (memory stays bounded whatever is published)


class FollowError(Exception):
    """No policy could be obtained to start with; one line."""


class Refused(Exception):
    """A published policy that must not be played; one line. `kind` sorts it for the
    player's metrics (REFUSAL_KINDS). `retry`: the same entry may be fetched again later
    (its file did not match its checksum: a corrupt transfer or a file being replaced);
    otherwise it is never fetched again."""

    def __init__(self, reason: str, kind: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.kind = kind
        self.retry = retry


# Why policies are refused, as the player's metrics count them.
REFUSAL_KINDS = (
    "entry",        # a malformed entry in latest.json
    "size",         # larger than --max-policy-mb
    "signature",    # unsigned, forged, or signed by a key this device does not trust
    "older",        # not newer than what this device played (a replay, an old run)
    "environment",  # made for another environment or stream
    "checksum",     # the file does not match the entry's SHA-256
    "model",        # not a usable model, or one that disagrees with its entry
)


@dataclass
class Candidate:
    entry: Entry
    policy: Policy


def default_cache_dir(source: Source) -> Path:
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return Path("~/.cache/stream-agent/follow").expanduser() / digest


class Follower:
    """act(observation) with the newest verified policy; reload() between games."""

    def __init__(self, source: Source | str, *,
                 key_file: str | Path | Sequence[str | Path] | None = None,
                 cache_dir: str | Path | None = None, interval: float = 30.0,
                 max_policy_bytes: int = DEFAULT_MAX_POLICY_BYTES,
                 download_seconds: float = 300.0, threads: int = 1) -> None:
        """`source`: a policies directory or its http(s) URL (ValueError if neither);
        `key_file`: a key file, or a list of them (several during a rotation): the
        learner's public keys (or shared secrets), one of which must have signed every
        entry (runtime.device.keys; KeyFileError if one cannot be used); `cache_dir`: where
        verified policies are kept."""
        self.source = source if isinstance(source, Source) else Source(source)
        paths = [key_file] if isinstance(key_file, str | Path) else list(key_file or [])
        self.trusted = TrustedKeys.from_files(paths) if paths else None
        self.cache = Path(cache_dir) if cache_dir is not None else \
            default_cache_dir(self.source)
        self.interval = interval
        self.max_policy_bytes = max_policy_bytes
        self.download_seconds = download_seconds
        self.threads = threads
        self.current: Candidate | None = None
        self.accepted = Accepted()           # read from the cache by start()
        self.played: list[int] = []          # the steps of the policies played, in order
        self.refused: list[dict[str, Any]] = []
        self.refusals = dict.fromkeys(REFUSAL_KINDS, 0)  # all time, by kind
        self.source_errors = 0
        self.last_good_look: float | None = None  # Unix time latest.json was last read
        self._refused_keys: dict[tuple, str] = {}  # refused entries -> why
        self._reported: set[tuple] = set()
        self._ready: Candidate | None = None
        self._down: str | None = None        # the source's condition while it is down
        self._fetch_trouble: tuple | None = None  # (step, condition) while downloads fail
        # Why the last look gave no policy: (kind, step, text), kind "source", "refused" or
        # "fetch"; None when there was simply nothing newer.
        self.problem: tuple[str, Any, str] | None = None
        self._probe: np.ndarray | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the policy interface ------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self.current.policy

    @property
    def step(self) -> int | None:
        return self.current.entry.step if self.current is not None else None

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
        """The first policy. The cached one (checked again) is what the device trusts; the
        source is asked once, and a newer policy there that passes every check plays
        instead. With a verified cached policy the start never waits on the source for
        more than about twice its timeout (an index read, a download), whatever it says:
        one log line names what was refused and the cached policy plays. Without one, and
        with `wait` > 0, the source is asked again (every `interval` seconds, at most 1 s)
        for up to `wait` seconds: a device may boot before the learner has published
        anything. Then the background checks begin. Raises FollowError (one line, the real
        reason) when there is no usable policy anywhere."""
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FollowError(f"cache directory {self.cache}: {exc.strerror or exc}") from None
        self._remove_partials()  # left by a device that lost power while downloading
        self.accepted = self._read_accepted()
        cached, cache_problem = self._cached()
        if cached is not None:
            self.accepted = self.accepted.record(cached.entry)
        deadline = time.monotonic() + wait
        while True:
            first, problem = self._first(cached)
            if first is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise FollowError(f"{problem}; the cache {self.cache} holds no verified "
                                  f"policy ({cache_problem})")
            if self._stop.wait(min(self.interval, 1.0, left)):
                raise FollowError("stopped before any policy was obtained")
        self._swap(first, cached=first is cached, was=cached)
        self._thread = threading.Thread(target=self._watch, name="follow", daemon=True)
        self._thread.start()
        return first.policy

    def _first(self, cached: Candidate | None) -> tuple[Candidate | None, str]:
        """(the first policy, or None and why not). With a cached policy the source's is
        taken only if newer, and its download is bounded by the source's timeout."""
        seconds = min(self.download_seconds, self.source.timeout) if cached else None
        first = None
        try:  # a failure here is the one log or error line
            first = self.check(announce=False, known=cached, download_seconds=seconds)
        except SourceError:
            pass
        if self._stop.is_set():
            return None, "stopped before any policy was obtained"
        if first is not None:
            return first, ""
        kind, step, text = self.problem or ("", None, "")
        if cached is not None:
            if kind == "refused":
                line = f"refused policy step {step} from {self.source}: {text}"
            elif kind == "fetch":
                line = f"policy step {step} not fetched from {self.source} ({text})"
            elif kind == "source":
                line = f"cannot read {self.source} ({text})"
            else:  # nothing newer than the cached policy: nothing to say
                return cached, ""
            log.warning("%s; playing the cached policy of step %d", line, cached.entry.step)
            return cached, ""
        if kind == "refused":
            return None, f"no usable policy in {self.source}: {text}"
        if kind == "fetch":
            return None, f"no policy could be obtained: policy step {step} not fetched " \
                         f"from {self.source} ({text})"
        return None, f"no policy could be obtained: {text or 'nothing published'}"

    def reload(self) -> bool:
        """Swap to the newest verified policy, if one is waiting; call between games."""
        with self._lock:  # the watcher never sees it neither ready nor accepted
            ready, self._ready = self._ready, None
            if ready is not None:
                self.accepted = self.accepted.record(ready.entry)
        if ready is None:  # the watcher offers only what `accepted` lets in
            return False
        self._swap(ready)
        return True

    def close(self) -> None:
        """Stop the background checks: a download in progress ends at once (its partial
        file removed); returns within about CLOSE_SECONDS whatever the source does."""
        self._stop.set()
        self.source.stop()
        if self._thread is not None:
            self._thread.join(timeout=CLOSE_SECONDS)
        self._remove_partials()

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
                continue  # logged by check; the current policy keeps playing, looking on
            except Exception as exc:  # noqa: BLE001 - following must outlive any surprise
                log.warning("policy check failed (%s: %s); the current policy keeps playing",
                            type(exc).__name__, exc)
                continue
            if candidate is not None:
                with self._lock:
                    self._ready = candidate

    def check(self, announce: bool = True, *, known: Candidate | None = None,
              download_seconds: float | None = None) -> Candidate | None:
        """One look at latest.json: a verified policy newer than the one playing (and than
        `known`), or None (the same, refused, or not fetched; `problem` says which).
        SourceError when the source cannot be read. A condition (the source down or slow,
        downloads failing) is logged when it starts and when it ends, a refusal once;
        unless `announce` is False, which keeps them out of the log (the caller reports)."""
        warn = log.warning if announce else log.debug
        self.problem = None
        try:
            raw = self.source.read_index()
            data = parse_index(raw)
        except (SourceError, ManifestError) as exc:
            if self._stop.is_set():
                raise SourceError("stopped") from None
            self.source_errors += 1
            condition = getattr(exc, "condition", str(exc))
            if self._down != condition:
                warn("source problem, the current policy keeps playing: %s", exc)
            self._down = condition
            self.problem = ("source", None, str(exc))
            raise SourceError(str(exc)) from None
        self.last_good_look = time.time()
        if self._down is not None:
            log.info("source %s answers again", self.source)
            self._down = None
        step = data.get("step") if isinstance(data, dict) else None
        if any(c is not None and c.entry.fields == data for c in (self.current, self._ready,
                                                                  known)):
            return None  # the policy playing (or waiting to): nothing to say
        key = (step, data.get("sha256"), data.get("signature")) if isinstance(data, dict) \
            else (None, raw)
        if key in self._refused_keys:
            self.problem = ("refused", step, self._refused_keys[key])
            return None
        try:
            candidate = self._verify(data, download_seconds or self.download_seconds)
        except (SourceError, OSError) as exc:  # a transfer or disk problem: try again later
            if self._stop.is_set():
                return None
            self.source_errors += 1
            text = str(exc) if isinstance(exc, SourceError) else \
                f"{type(exc).__name__}: {exc.strerror or exc}"
            condition = (step, getattr(exc, "condition", text))
            if self._fetch_trouble != condition:
                warn("policy step %s not fetched (%s); retrying later", step, text)
            self._fetch_trouble = condition
            self.problem = ("fetch", step, text)
            return None
        except Refused as exc:
            if len(self._reported) >= MAX_REMEMBERED:  # a source that publishes junk forever
                self._reported.clear()
                self._refused_keys.clear()
                del self.refused[:-MAX_REMEMBERED // 10]
            if not exc.retry:
                self._refused_keys[key] = str(exc)
            if (key, str(exc)) not in self._reported:  # one record and line per refusal
                self._reported.add((key, str(exc)))
                name = data.get("file") if isinstance(data, dict) else None
                self.refused.append({"step": step, "file": name, "reason": str(exc)})
                self.refusals[exc.kind] += 1
                warn("refused policy step %s: %s", step, exc)
            self.problem = ("refused", step, str(exc))
            return None
        self._downloads_work(step)
        return candidate

    def _downloads_work(self, step: Any) -> None:
        if self._fetch_trouble is not None:
            log.info("policy step %s downloaded from %s (the download problem is over)",
                     step, self.source)
            self._fetch_trouble = None

    def _verify(self, data: Any, download_seconds: float) -> Candidate:
        try:
            entry = parse_entry(data, self.trusted, self.max_policy_bytes)
        except ManifestError as exc:
            raise Refused(str(exc), exc.kind) from None
        with self._lock:
            ready, accepted = self._ready, self.accepted
        if ready is not None:  # what will play next counts as accepted
            accepted = accepted.record(ready.entry)
        why = accepted.refuses(entry, signed=self.trusted is not None)
        if why is not None:
            raise Refused(why, "older")
        if self.current is not None and entry.env_id != self.current.entry.env_id:
            raise Refused(f"made for {entry.env_id}, this device plays "
                          f"{self.current.entry.env_id}", "environment")
        tmp = self.cache / f"{PARTIAL}{entry.file}"
        try:
            self.source.download(entry.file, tmp, entry.size, download_seconds)
            digest = sha256_file(tmp)
            if digest != entry.sha256:
                raise Refused(f"sha256 {digest[:16]}... does not match the manifest's "
                              f"{entry.sha256[:16]}...", "checksum", retry=True)
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
            raise Refused(str(exc).replace(str(path), entry.file), "model") from None
        meta = policy.metadata
        if meta["training_step"] != entry.step or meta["env_id"] != entry.env_id:
            raise Refused(f"the model says step {meta['training_step']} of "
                          f"{meta['env_id']}, the manifest step {entry.step} of {entry.env_id}",
                          "model")
        if self.current is not None:
            ours = self.current.policy.metadata
            for key in STREAM_KEYS:
                if meta[key] != ours[key]:
                    raise Refused(f"made for another stream: {key} is {meta[key]!r} there, "
                                  f"{ours[key]!r} here", "environment")
        probe = self._probe
        observation = np.zeros(policy.observation_shape, policy.observation_dtype) \
            if probe is None else np.array(probe, dtype=policy.observation_dtype)
        try:
            logits = policy.logits(observation[None])
            action = policy.act(observation)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
            raise Refused(f"forward pass failed ({type(exc).__name__})", "model") from None
        if not np.isfinite(logits).all() or not 0 <= action < policy.num_actions:
            raise Refused("forward pass gives non-finite logits or an action out of range",
                          "model")
        return policy

    # -- the cache -----------------------------------------------------------------------------

    def _swap(self, candidate: Candidate, cached: bool = False,
              was: Candidate | None = None) -> None:
        """Play `candidate` from now on; `was`: the cached policy it replaces at start."""
        previous, self.current = self.current, candidate
        if previous is None and was is not candidate:
            previous = was
        entry = candidate.entry
        self.played.append(entry.step)
        self.accepted = self.accepted.record(entry)
        try:  # what a restart plays while the source is down, and what it never goes below
            write_atomic(self.cache / CURRENT, json.dumps(entry.fields).encode())
            write_atomic(self.cache / ACCEPTED, self.accepted.to_json())
            gone = previous.entry.file if previous is not None else None
            for old in self.cache.glob("policy-*.onnx"):
                # Names sort by step; a newer one may be ready. The one played before goes
                # too (a rollback or a new run plays a lower step).
                if old.name != entry.file and (old.name < entry.file or old.name == gone):
                    old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cache %s not updated (%s)", self.cache, exc.strerror or exc)
        notes = [entry.file]
        if cached:
            notes.append("from the cache")
        signer = signed_by(entry.fields.get("signature"))
        if signer is not None and self.trusted is not None:
            notes.append(f"signed by key {signer}")
        if entry.replaces is not None:
            notes.append(f"a rollback by the learner from step {entry.replaces['step']}")
        elif previous is not None and previous.entry.run != entry.run:
            notes.append("a new run")
        if previous is not None:
            notes.append(f"was step {previous.entry.step}" + (
                f" of {run_label(previous.entry.run)}" if previous.entry.run != entry.run
                else ""))
        of_run = f" of run {entry.run}" if entry.run is not None else ""
        log.info("playing policy step %d%s (%s)", entry.step, of_run, ", ".join(notes))

    def _read_accepted(self) -> Accepted:
        """The runs and steps this cache accepted (none when it holds no accepted.json: a
        cache of a device before run identities starts from its cached policy)."""
        try:
            return Accepted.from_json((self.cache / ACCEPTED).read_bytes())
        except FileNotFoundError:
            return Accepted()
        except (OSError, ManifestError) as exc:
            why = exc if isinstance(exc, ManifestError) else exc.strerror or exc
            log.warning("%s not read (%s): starting from the cached policy's run and step",
                        self.cache / ACCEPTED, why)
            return Accepted()

    def _cached(self) -> tuple[Candidate | None, str]:
        """(the policy last played from this cache, checked again as if just downloaded:
        its entry and signature, its SHA-256, the model; or None and why not)."""
        try:
            raw = (self.cache / CURRENT).read_bytes()
        except FileNotFoundError:
            return None, "nothing cached"
        except OSError as exc:
            return None, f"{CURRENT}: {exc.strerror or exc}"
        try:
            entry = parse_entry(json.loads(raw), self.trusted, self.max_policy_bytes)
        except ValueError as exc:  # not JSON, or a ManifestError
            return None, f"{CURRENT}: {exc if isinstance(exc, ManifestError) else 'not JSON'}"
        if not self.accepted.same_run(entry):  # else what the cache played last is trusted
            why = self.accepted.refuses(entry, signed=self.trusted is not None)
            if why is not None:
                return None, f"{CURRENT}: policy step {entry.step}: {why}"
        path = self.cache / entry.file
        try:
            if sha256_file(path) != entry.sha256:
                return None, f"{entry.file} does not match its sha256"
            return Candidate(entry, self._load(path, entry)), ""
        except OSError as exc:
            return None, f"{entry.file}: {exc.strerror or exc}"
        except Refused as exc:
            return None, f"{entry.file}: {exc}"

    def _remove_partials(self) -> None:
        try:
            for partial in self.cache.glob(f"{PARTIAL}*"):
                partial.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cache %s: partial downloads not removed (%s)", self.cache,
                        exc.strerror or exc)
