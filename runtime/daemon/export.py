"""The actor as one verified ONNX file: the one export used by tools/export_onnx.py and by
the daemon's policy publisher (runtime.daemon.publish).

The graph is the policy half of the network only: input ``observation`` exactly as the
stream gives it (uint8 N x C x H x W frames or float32 N x D vectors, dynamic N), outputs
``logits`` (float32 N x A) and ``action`` (int64 N, the greedy argmax). uint8 scaling and the
frozen observation-normalisation statistics are inside the graph; the metadata carries
everything the device side (``runtime.device``) needs to rebuild the same stream. A written
model is checked (onnx.checker) and compared with the torch actor on real stream
observations: max |logit difference| <= LOGIT_TOLERANCE and identical greedy actions, or it
is deleted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch

from agent.networks import build_network
from runtime.contract import INPUT_NAME, OUTPUTS, POLICY_FORMAT_VERSION, StreamOptions
from runtime.daemon.checkpoints import CheckpointError, CheckpointStore, read_checkpoint
from runtime.daemon.config import Config, ConfigError, from_dict
from runtime.device.play import make_stream_from_metadata
from runtime.device.policy import ModelError, Policy, parse_metadata
from runtime.errors import first_line
from runtime.streams import StreamError, open_stream

DEFAULT_OPSET = 17
# LayerNormalization (the stream and mlp networks) is an ONNX op from opset 17; asked for
# less, the dynamo exporter silently writes opset 18 instead.
MIN_OPSET = 17
LOGIT_TOLERANCE = 1e-4
PARITY_FRAMES = 64


class ExportError(Exception):
    """Bad input (a missing or unusable checkpoint, an unwritable path): one line."""


class VerificationError(Exception):
    """The written model does not behave like the torch actor."""


class _Actor(torch.nn.Module):
    """obs -> (logits, greedy action as int64): the deployed interface."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(observation)
        return logits, torch.argmax(logits, dim=-1)


# -- the actor ---------------------------------------------------------------------------------


def resolve_checkpoint(run_dir: str | None, checkpoint: str | None) -> tuple[dict, Path]:
    """Load the given checkpoint, or the newest good one of a run; raises ExportError."""
    try:
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise ExportError(f"checkpoint {path} not found")
            return read_checkpoint(path), path
        directory = Path(run_dir)
        if not directory.is_dir():
            raise ExportError(f"run directory {directory} not found")
        found = CheckpointStore(directory / "checkpoints", keep=1).load_latest()
        if found is None:
            raise ExportError(f"no checkpoint in {directory / 'checkpoints'}")
        return found
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def load_actor(payload: dict[str, Any], name: str = "checkpoint"
               ) -> tuple[torch.nn.Module, Config]:
    """The torch actor (obs -> logits, eval mode) of a checkpoint and the run's Config;
    raises ExportError."""
    try:
        spec = payload["spec"]
        # The spec names the network the weights belong to; the stored config may say
        # `auto`, which picks another network for frames since shared-stream became it.
        config = from_dict(payload["config"]).on_network(spec["network"])
        agent = config.agent
        net = build_network(agent.network, tuple(spec["observation_shape"]),
                            int(spec["num_actions"]), hidden_size=agent.hidden_size,
                            sparsity=agent.sparsity, normalize=agent.normalize_observations)
        # Only the weights (and the normaliser statistics among them) make the actor; the
        # optimiser state is not needed, so its format may change without breaking export.
        net.load_state_dict(payload["learner"]["network"])
    except ConfigError as exc:
        raise ExportError(f"{name}: stored config is invalid: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{name}: does not hold a usable actor ({type(exc).__name__}: "
                          f"{first_line(exc, 200)})") from None
    return net.policy().eval(), config


def policy_weights(policy: torch.nn.Module) -> dict[str, np.ndarray]:
    """A copy of the actor's weights and normaliser statistics as numpy arrays: what the
    learner hands to the publisher (it pickles cheaply and shares nothing with training)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in policy.state_dict().items()}


class ActorBuilder:
    """Rebuilds the actor of a run from `policy_weights` snapshots (in the publisher's
    process: one network, reloaded for every snapshot)."""

    def __init__(self, config: Config, observation_shape: tuple[int, ...],
                 num_actions: int) -> None:
        agent = config.agent
        net = build_network(agent.network, tuple(observation_shape), num_actions,
                            hidden_size=agent.hidden_size, sparsity=agent.sparsity,
                            normalize=agent.normalize_observations)
        self.policy = net.policy().eval()

    def load(self, weights: Mapping[str, np.ndarray]) -> torch.nn.Module:
        self.policy.load_state_dict({k: torch.from_numpy(np.asarray(v))
                                     for k, v in weights.items()})
        return self.policy


# -- the stream the model plays ---------------------------------------------------------------


def stream_spec(config: Config, seed: int = 0) -> Any:
    """The StreamSpec of the run's stream, built exactly as the daemon builds it."""
    stream = open_stream(config.env, seed)
    try:
        return stream.spec
    finally:
        stream.close()


def build_metadata(config: Config, spec: Any, training_step: int, network: str,
                   producer: str) -> dict[str, str]:
    """The ONNX metadata_props (string -> string) that runtime.device.policy reads back."""
    env = config.env
    # frame_stack and frame_skip as the stream plays them: 1 and 1 for a non-Atari stream
    # (which ignores the options), so that runtime.device.follow compares like with like;
    # the time feature as auto resolved it.
    options = dataclasses.replace(StreamOptions.of(env), frame_stack=spec.frame_stack,
                                  frame_skip=spec.frame_skip, time_feature=spec.time_feature)
    return {
        "format_version": POLICY_FORMAT_VERSION,
        "env_id": env.id,
        "observation_shape": json.dumps(list(spec.observation_shape)),
        "observation_dtype": spec.observation_dtype,
        "num_actions": str(spec.num_actions),
        "action_meanings": json.dumps(list(spec.action_meanings)),
        "training_step": str(int(training_step)),
        **options.to_metadata(),
        "env_kwargs": json.dumps(env.kwargs, sort_keys=True),
        "network": network,
        "producer": producer,
    }


def check_actor_fits(metadata: Mapping[str, Any], observation_shape: Any, num_actions: Any,
                     name: str) -> None:
    """The stream rebuilt from the metadata must give what the actor was made for."""
    if list(metadata["observation_shape"]) != list(observation_shape or []) or \
            metadata["num_actions"] != num_actions:
        raise ExportError(f"{name}: the stream gives shape {metadata['observation_shape']}"
                          f" and {metadata['num_actions']} actions, the actor was made "
                          f"for {observation_shape} and {num_actions}")


def stream_frames(metadata: Mapping[str, Any], count: int, seed: int) -> np.ndarray:
    """`count` real observations from the stream the model was trained on, random actions,
    built exactly as runtime.device.play builds it (so the metadata is proven sufficient)."""
    stream = make_stream_from_metadata(metadata, seed=seed)
    try:
        rng = np.random.default_rng(seed)
        frames = [stream.reset()]
        while len(frames) < count:
            action = int(rng.integers(stream.spec.num_actions))
            obs, _, terminated, truncated, _ = stream.step(action)
            frames.append(stream.reset() if terminated or truncated else obs)
        return np.stack(frames[:count])
    finally:
        stream.close()


def training_frames(raw_metadata: Mapping[str, str], count: int, seed: int,
                    name: str) -> tuple[dict[str, Any], np.ndarray]:
    """(parsed metadata, `count` stream frames); ExportError if the stream cannot be made."""
    try:
        metadata = parse_metadata(raw_metadata, name)
        return metadata, stream_frames(metadata, count, seed)
    except (StreamError, ModelError) as exc:
        raise ExportError(f"cannot recreate the training stream: {exc}") from None


# -- export and verification ------------------------------------------------------------------


@contextlib.contextmanager
def quiet_loggers(*names: str):  # noqa: ANN201
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def write_onnx(actor: torch.nn.Module, example: np.ndarray, out: Path, opset: int,
               metadata: Mapping[str, str]) -> None:
    """Write `out` (one file, weights inside) and add the metadata; raises ExportError."""
    # The dynamo exporter (torch 2.13's default): the legacy TorchScript exporter cannot
    # export LayerNormNoParams (F.layer_norm(x, x.shape[1:]) with a dynamic batch axis makes
    # the normalised shape a traced value, which it refuses). external_data=False keeps the
    # weights inside the one file (the default writes a separate .onnx.data).
    example_t = torch.from_numpy(np.ascontiguousarray(example))
    batch = torch.export.Dim("batch", min=1)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        # The exporter chats on stdout and through torch's loggers (opset conversion notes,
        # torchvision not installed); the outcome is checked below, so keep the console clean.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                quiet_loggers("torch.onnx", "torch._export", "torch.export", "onnxscript"):
            warnings.simplefilter("ignore")
            torch.onnx.export(_Actor(actor), (example_t,), tmp, dynamo=True,
                              external_data=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUTS),
                              dynamic_shapes={INPUT_NAME: {0: batch}}, verbose=False)
        model = onnx.load(str(tmp))
        written = {o.domain: o.version for o in model.opset_import}.get("", None)
        if written != opset:
            raise ExportError(f"--opset {opset}: the exporter wrote opset {written} instead "
                              f"(supported here: {MIN_OPSET}..{onnx.defs.onnx_opset_version()})")
        set_metadata(model, metadata)
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    except OSError as exc:
        raise ExportError(f"cannot write {out} ({exc.strerror or exc})") from None
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures are many and varied
        raise ExportError(f"export at opset {opset} failed: {first_line(exc, 200)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "stream-agent-runtime"


class ActorGraph:
    """The actor's exported graph with every weight in an initializer named after it
    (``policy.<tensor>``): new weights of the same network are written into a copy of it
    instead of exporting again (milliseconds, not seconds). What it writes is verified like
    an export (`verify`)."""

    PREFIX = "policy."

    def __init__(self, model: onnx.ModelProto, slots: dict[str, str]) -> None:
        self.model = model
        self.slots = slots  # initializer name -> the actor's tensor name

    @classmethod
    def export(cls, actor: torch.nn.Module, example: np.ndarray, out: Path,
               opset: int = DEFAULT_OPSET) -> ActorGraph | None:
        """Export a copy of `actor` whose float tensors all hold distinct random values,
        so the exporter can neither merge equal constants (fresh zero biases) nor drop
        one; `out` is a scratch file, removed. None when some float tensor of the actor
        is not an initializer of its own name, shape and dtype (the exporter folded it
        into another constant, which writing weights would miss)."""
        scrambled = copy.deepcopy(actor)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in actor_tensors_of(scrambled).values():
                if tensor.dtype == torch.float32:
                    tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        try:
            write_onnx(scrambled, example, out, opset, {})
            model = onnx.load(str(out))
        finally:
            out.unlink(missing_ok=True)
        tensors = actor_tensors(actor)
        slots = {}
        for init in model.graph.initializer:
            name = init.name.removeprefix(cls.PREFIX)
            if name == init.name or name not in tensors:
                continue
            array = onnx.numpy_helper.to_array(init)
            if array.shape != tensors[name].shape or array.dtype != tensors[name].dtype:
                return None
            slots[init.name] = name
        needed = {name for name, t in tensors.items() if t.dtype == np.float32}
        return cls(model, slots) if needed <= set(slots.values()) else None

    def write(self, actor: torch.nn.Module, metadata: Mapping[str, str], out: Path) -> None:
        """`out`: the graph with the actor's weights and `metadata`; raises ExportError."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        tensors = actor_tensors(actor)
        for init in model.graph.initializer:
            name = self.slots.get(init.name)
            if name is not None:
                init.CopyFrom(onnx.numpy_helper.from_array(tensors[name], init.name))
        set_metadata(model, metadata)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(model.SerializeToString())
            os.replace(tmp, out)
        except OSError as exc:
            raise ExportError(f"cannot write {out} ({exc.strerror or exc})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def write_verified(self, actor: torch.nn.Module, metadata: Mapping[str, str],
                       frames: np.ndarray, out: Path) -> dict[str, Any]:
        """As `export_verified`, from this graph."""
        self.write(actor, metadata, out)
        try:
            return verify(out, actor, frames)
        except VerificationError:
            out.unlink(missing_ok=True)
            raise


def actor_tensors_of(actor: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the actor, derived buffers included, by name."""
    tensors = dict(actor.named_parameters())
    tensors.update(actor.named_buffers())
    return tensors


def actor_tensors(actor: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in actor_tensors_of(actor).items()}


def torch_logits(actor: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return actor(torch.from_numpy(np.ascontiguousarray(frames))).numpy()


def policy_logits(policy: Policy, frames: np.ndarray) -> np.ndarray:
    """Logits one observation at a time (as deployed) and as one batch (dynamic axis)."""
    single = np.concatenate([policy.logits(f[None]) for f in frames])
    batched = policy.logits(frames)
    # Batched and single evaluations may differ by float rounding only.
    if not np.allclose(single, batched, atol=LOGIT_TOLERANCE, rtol=0):
        raise VerificationError("batched and single-observation logits differ beyond "
                                f"{LOGIT_TOLERANCE}")
    return single


def verify(path: Path, actor: torch.nn.Module, frames: np.ndarray) -> dict[str, Any]:
    """onnx.checker + parity with the torch actor; raises VerificationError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError and friends
        raise VerificationError(f"onnx.checker rejects {path}: {first_line(exc, 200)}") from None
    try:
        policy = Policy.load(path)
    except ModelError as exc:
        raise VerificationError(str(exc)) from None
    ours = policy_logits(policy, frames)
    ref = torch_logits(actor, frames)
    diff = float(np.max(np.abs(ours - ref)))
    actions = np.array([policy.act(f) for f in frames])
    agreement = float(np.mean(actions == ref.argmax(axis=-1)))
    if not diff <= LOGIT_TOLERANCE:
        raise VerificationError(f"parity: max |logit difference| {diff:.3g} > "
                                f"{LOGIT_TOLERANCE} on {len(frames)} stream observations")
    if agreement < 1.0:
        raise VerificationError(f"parity: greedy actions agree on only {agreement:.1%} of "
                                f"{len(frames)} stream observations")
    return {"max_abs_logit_diff": diff, "action_agreement": agreement,
            "parity_frames": len(frames)}


def export_verified(actor: torch.nn.Module, metadata: Mapping[str, str], frames: np.ndarray,
                    out: Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write `out` and verify it against `actor` on `frames`; returns the parity figures.
    A model that fails its checks is deleted (VerificationError); bad input: ExportError."""
    write_onnx(actor, frames[:2], out, opset, metadata)
    try:
        return verify(out, actor, frames)
    except VerificationError:
        out.unlink(missing_ok=True)  # never leave a model that failed its checks behind
        raise
