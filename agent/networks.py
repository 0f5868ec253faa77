"""Actor-critic networks: the seed notebook's shared conv trunk, the stream-x towers, an MLP.

Every network takes observations exactly as the stream gives them (uint8 frames or float
vectors) and does its own scaling and normalisation, so the exported actor needs nothing
from the host but the raw observation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from agent.normalizers import RunningNorm


class Preprocess(nn.Module):
    """uint8 -> float in [0, 1] for images, then optional running normalisation."""

    def __init__(self, shape: tuple[int, ...], is_image: bool, normalize: bool) -> None:
        super().__init__()
        self.scale = 1.0 / 255.0 if is_image else 1.0
        self.norm = RunningNorm(shape) if normalize else None

    def scaled(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float()
        return x * self.scale if self.scale != 1.0 else x

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.scaled(obs)
        return self.norm(x) if self.norm is not None else x


class LayerNormNoParams(nn.Module):
    """LayerNorm over all non-batch axes with no affine parameters (stream-x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[1:])


def sparse_init_(module: nn.Module, sparsity: float) -> None:
    """Uniform +-sqrt(1/fan_in) weights with `sparsity` of each unit's fan-in zeroed; zero bias.

    Sparse fan-in makes units respond to different inputs from the first step, which
    stream-x found reduces interference between one-sample updates. As in stream-x, the
    number zeroed is rounded up, so a layer with fewer than 10 inputs (the first layer
    over a small vector: CartPole's 4, Acrobot's 6) starts with every weight at zero. That
    layer is not blind: the parameter-free LayerNorm after it turns the first gradients
    into large, well-spread steps, where keeping one input per unit learned far slower
    on Acrobot (docs/experiments.md).
    """
    for layer in module.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        weight = layer.weight.data
        fan_out = weight.shape[0]
        fan_in = weight[0].numel()
        num_zeros = int(math.ceil(sparsity * fan_in))
        bound = math.sqrt(1.0 / fan_in)
        weight.uniform_(-bound, bound)
        rows = weight.view(fan_out, fan_in)
        for unit in range(fan_out):
            rows[unit, torch.randperm(fan_in)[:num_zeros]] = 0.0
        if layer.bias is not None:
            layer.bias.data.zero_()


def _stream_conv_tower(channels: int, hidden: int, out: int,
                       in_hw: tuple[int, int]) -> nn.Sequential:
    convs = nn.Sequential(
        nn.Conv2d(channels, 32, 8, stride=5), LayerNormNoParams(), nn.LeakyReLU(),
        nn.Conv2d(32, 64, 4, stride=3), LayerNormNoParams(), nn.LeakyReLU(),
        nn.Conv2d(64, 64, 3, stride=2), LayerNormNoParams(), nn.LeakyReLU(),
        nn.Flatten(),
    )
    flat = _flat_size(convs, (channels, *in_hw))
    return nn.Sequential(*convs, nn.Linear(flat, hidden), LayerNormNoParams(), nn.LeakyReLU(),
                         nn.Linear(hidden, out))


def _mlp_tower(inputs: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), LayerNormNoParams(), nn.LeakyReLU(),
        nn.Linear(hidden, hidden), LayerNormNoParams(), nn.LeakyReLU(),
        nn.Linear(hidden, out),
    )


class FrameTooSmall(ValueError):
    """Frames smaller than a network's convolutions can take."""

    def __init__(self, frame: tuple[int, int], smallest: int) -> None:
        super().__init__(f"frames of {frame[0]}x{frame[1]} are smaller than the "
                         f"{smallest}x{smallest} the network's convolutions need")
        self.frame, self.smallest = frame, smallest


def min_frame_size(module: nn.Module) -> int:
    """The smallest square frame the module's stack of convolutions leaves at least one
    output pixel of (n_in = (n_out - 1) * stride + kernel, from the last layer back)."""
    size = 1
    for conv in reversed([m for m in module.modules() if isinstance(m, nn.Conv2d)]):
        size = (size - 1) * conv.stride[0] + conv.kernel_size[0]
    return size


def _flat_size(module: nn.Module, shape: tuple[int, ...]) -> int:
    smallest = min_frame_size(module)
    if len(shape) == 3 and min(shape[1:]) < smallest:
        raise FrameTooSmall((shape[1], shape[2]), smallest)
    with torch.no_grad():
        return int(module(torch.zeros(1, *shape)).shape[1])


class ActorCritic(nn.Module):
    """Preprocess, an optional shared trunk, then a policy head (logits) and a value head.

    `policy` is a self-contained module obs -> logits sharing these parameters: it is
    what gets exported and deployed.
    """

    def __init__(self, preprocess: Preprocess, trunk: nn.Module | None,
                 policy_head: nn.Module, value_head: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.trunk = trunk if trunk is not None else nn.Identity()
        self.shared_trunk = trunk is not None
        self.policy_head = policy_head
        self.value_head = value_head

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.preprocess(obs))

    def heads(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, value) from preprocessed inputs."""
        features = self.trunk(inputs)
        return self.policy_head(features), self.value_head(features).squeeze(-1)

    def value(self, inputs: torch.Tensor) -> torch.Tensor:
        """V from preprocessed inputs."""
        return self.value_head(self.trunk(inputs)).squeeze(-1)

    def policy(self) -> nn.Module:
        return nn.Sequential(self.preprocess, self.trunk, self.policy_head)

    def flat_order(self) -> list[nn.Parameter]:
        """The weights in the order the learner keeps them: policy head, trunk, value
        head, so that the policy's weights (head and trunk) and the value's (trunk and
        head) are each one contiguous run."""
        return [*self.policy_head.parameters(), *self.trunk.parameters(),
                *self.value_head.parameters()]


# Names networks had before they were named by their shape; still read (configs,
# checkpoints) as the network they always meant.
FORMER_NAMES = {"seed": "shared-conv"}


def resolve_network(name: str, observation_shape: tuple[int, ...]) -> str:
    """`auto` -> shared-stream for stacked frames (C, H, W), mlp for vectors.

    For frames a shared trunk, which the critic's denser signal shapes for the actor too,
    learned Breakout where separate towers did not, and stream-x's wider layers in it
    (shared-stream) went on climbing where the notebook's smaller ones flattened
    (docs/experiments.md)."""
    name = FORMER_NAMES.get(name, name)
    if name != "auto":
        return name
    return "shared-stream" if len(observation_shape) == 3 else "mlp"


def build_network(name: str, observation_shape: tuple[int, ...], num_actions: int, *,
                  hidden_size: int, sparsity: float, normalize: bool) -> ActorCritic:
    """Build the named network for a stream; raises ValueError when it cannot fit it."""
    name = resolve_network(name, observation_shape)
    is_image = len(observation_shape) == 3
    if name in ("shared-conv", "shared-stream", "stream") and not is_image:
        raise ValueError(f"network '{name}' needs image observations (C, H, W), "
                         f"the stream gives shape {observation_shape}")
    if name == "mlp" and len(observation_shape) != 1:
        raise ValueError(f"network 'mlp' needs vector observations, the stream gives "
                         f"shape {observation_shape}")
    preprocess = Preprocess(observation_shape, is_image, normalize)
    if name == "shared-conv":
        trunk = nn.Sequential(
            nn.Conv2d(observation_shape[0], 16, 5, stride=2), nn.ReLU(),
            nn.Conv2d(16, 32, 5, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 5, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        flat = _flat_size(trunk, observation_shape)
        return ActorCritic(preprocess, trunk, nn.Linear(flat, num_actions), nn.Linear(flat, 1))
    if name == "shared-stream":
        # The stream-x layers (LayerNorm, LeakyReLU, sparse init) as one trunk under
        # linear heads: the shared trunk of shared-conv with stream-x's width and depth.
        hw = (observation_shape[1], observation_shape[2])
        trunk = _stream_conv_tower(observation_shape[0], hidden_size, hidden_size, hw)
        trunk.append(LayerNormNoParams())
        trunk.append(nn.LeakyReLU())
        policy_head, value_head = nn.Linear(hidden_size, num_actions), nn.Linear(hidden_size, 1)
        for part in (trunk, policy_head, value_head):
            sparse_init_(part, sparsity)
        return ActorCritic(preprocess, trunk, policy_head, value_head)
    if name == "stream":
        hw = (observation_shape[1], observation_shape[2])
        policy = _stream_conv_tower(observation_shape[0], hidden_size, num_actions, hw)
        value = _stream_conv_tower(observation_shape[0], hidden_size, 1, hw)
    elif name == "mlp":
        policy = _mlp_tower(observation_shape[0], hidden_size, num_actions)
        value = _mlp_tower(observation_shape[0], hidden_size, 1)
    else:
        raise ValueError(f"unknown network '{name}'")
    sparse_init_(policy, sparsity)
    sparse_init_(value, sparsity)
    return ActorCritic(preprocess, None, policy, value)
