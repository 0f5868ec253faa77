"""An exported ONNX actor: its metadata schema, loading and checking the model, acting.

The exporter (runtime.daemon.export) writes the metadata as strings; `parse_metadata`
decodes and validates them, and `Policy.load` refuses a file whose graph disagrees with
them. Standard library, numpy and onnxruntime only. Every refusal is a one-line
ModelError.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.contract import (
    ACTION,
    INPUT_NAME,
    KNOWN_POLICY_FORMAT_VERSIONS,
    LOGITS,
    OUTPUTS,
    REQUIRED_OPTION_NAMES,
    StreamOptions,
)
from runtime.errors import first_line

# Metadata keys the exporter writes besides the stream options (StreamOptions reads those);
# all values are strings in the ONNX file.
_INT_KEYS = ("num_actions", "training_step")
_JSON_KEYS = ("observation_shape", "action_meanings", "env_kwargs")
_STR_KEYS = ("format_version", "env_id", "observation_dtype")
REQUIRED_KEYS = _STR_KEYS + _INT_KEYS + _JSON_KEYS + REQUIRED_OPTION_NAMES
_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


class ModelError(ValueError):
    """A model that cannot be used (missing, not ONNX, bad metadata, wrong stream); one line."""


def parse_metadata(raw: Mapping[str, str], source: str = "model") -> dict[str, Any]:
    """Validate and decode the exporter's string metadata; raises ModelError."""
    version = raw.get("format_version")
    if version is None:
        # A device has the wheel, not the tools: it can only ask for an exported policy.
        raise ModelError(f"{source}: no format_version in the metadata (not a policy "
                         f"exported by the learner: run `python tools/export_onnx.py` on "
                         f"the learner's machine, or follow its published policies)")
    if version not in KNOWN_POLICY_FORMAT_VERSIONS:
        raise ModelError(f"{source}: metadata format_version {version!r} is not supported "
                         f"(known: {', '.join(KNOWN_POLICY_FORMAT_VERSIONS)})")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ModelError(f"{source}: metadata lacks {', '.join(missing)}")
    meta: dict[str, Any] = {key: raw[key] for key in _STR_KEYS}
    try:
        for key in _INT_KEYS:
            meta[key] = int(raw[key])
        for key in _JSON_KEYS:
            meta[key] = json.loads(raw[key])
    except ValueError as exc:
        raise ModelError(f"{source}: malformed metadata value ({first_line(exc, 300)})") from None
    try:
        meta.update(dataclasses.asdict(StreamOptions.from_metadata(raw)))
    except ValueError as exc:  # names the option and the value
        raise ModelError(f"{source}: {first_line(exc, 300)}") from None
    shape = meta["observation_shape"]
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0
                                                      for d in shape)):
        raise ModelError(f"{source}: metadata observation_shape {raw['observation_shape']} "
                         f"is not a list of positive ints")
    meta["observation_shape"] = tuple(shape)
    if meta["observation_dtype"] not in ("uint8", "float32"):
        raise ModelError(f"{source}: metadata observation_dtype {meta['observation_dtype']!r} "
                         f"is not uint8 or float32")
    if meta["num_actions"] < 1 or len(meta["action_meanings"]) != meta["num_actions"]:
        raise ModelError(f"{source}: metadata num_actions {meta['num_actions']} does not match "
                         f"{len(meta['action_meanings'])} action meanings")
    if not isinstance(meta["env_kwargs"], dict):
        raise ModelError(f"{source}: metadata env_kwargs is not a JSON object")
    meta["action_meanings"] = tuple(str(m) for m in meta["action_meanings"])
    # Keys written by newer exporters within the same format version are kept as strings.
    for key, value in raw.items():
        meta.setdefault(key, value)
    return meta


def session_options(threads: int = 1) -> ort.SessionOptions:
    """One small CPU: `threads` intra-op threads, no inter-op parallelism, sequential
    execution, all graph optimisations (constant folding, conv+activation fusion...)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: keep stderr for our own one-line messages
    return opts


class Policy:
    """An exported actor: observation (as the stream gives it) -> action."""

    def __init__(self, session: ort.InferenceSession, metadata: dict[str, Any],
                 path: str = "model") -> None:
        self._session = session
        self.metadata = metadata
        self.path = path
        self.observation_shape: tuple[int, ...] = metadata["observation_shape"]
        self.observation_dtype = np.dtype(metadata["observation_dtype"])
        self.num_actions: int = metadata["num_actions"]
        self._default_rng = np.random.default_rng()

    @classmethod
    def load(cls, path: str | Path, threads: int = 1) -> Policy:
        """Open and validate an exported model; raises ModelError (one line)."""
        path = Path(path)
        if threads < 1:
            raise ModelError(f"threads must be >= 1, got {threads}")
        if not path.is_file():
            raise ModelError(f"model file {path} not found")
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/Invalid*
            raise ModelError(f"{path}: not a loadable ONNX model "
                             f"({first_line(exc, 300)})") from None
        meta = parse_metadata(session.get_modelmeta().custom_metadata_map, str(path))
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelError(f"{path}: expected one input named {INPUT_NAME!r}, found "
                             f"{[i.name for i in inputs]}")
        outputs = [o.name for o in session.get_outputs()]
        if not set(OUTPUTS) <= set(outputs):
            raise ModelError(f"{path}: expected outputs {list(OUTPUTS)}, found {outputs}")
        graph_dtype = _ORT_DTYPES.get(inputs[0].type, inputs[0].type)
        if graph_dtype != meta["observation_dtype"]:
            raise ModelError(f"{path}: graph input is {graph_dtype} but the metadata says "
                             f"{meta['observation_dtype']}")
        graph_shape = tuple(inputs[0].shape[1:])
        if graph_shape != meta["observation_shape"]:
            raise ModelError(f"{path}: graph input shape {graph_shape} does not match the "
                             f"metadata observation_shape {meta['observation_shape']}")
        return cls(session, meta, str(path))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, num_actions) float32 for a batch (N, *observation_shape)."""
        batch = np.ascontiguousarray(batch, dtype=self.observation_dtype)
        if batch.shape[1:] != self.observation_shape:
            raise ValueError(f"batch shape {batch.shape} does not fit the model's observation "
                             f"shape {self.observation_shape}")
        return self._session.run([LOGITS], {INPUT_NAME: batch})[0]

    def act(self, observation: np.ndarray, sample: bool = False,
            rng: np.random.Generator | None = None) -> int:
        """Action for one observation (no batch axis): greedy argmax, or sampled from
        softmax(logits) with `rng` (a fresh unseeded generator when None)."""
        obs = np.asarray(observation, dtype=self.observation_dtype)
        if obs.shape != self.observation_shape:
            raise ValueError(f"observation shape {obs.shape} does not fit the model's "
                             f"{self.observation_shape}")
        batch = obs[None]
        if not sample:
            return int(self._session.run([ACTION], {INPUT_NAME: batch})[0][0])
        logits = self._session.run([LOGITS], {INPUT_NAME: batch})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        cdf = np.cumsum(probs)
        u = (rng if rng is not None else self._default_rng).random() * cdf[-1]
        return min(int(np.searchsorted(cdf, u, side="right")), self.num_actions - 1)
