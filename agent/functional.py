"""The network as a function of its weights: what the pure update differentiates.

`ActorCritic` (agent/networks.py) stays the one definition of each network: its initial
weights, its checkpoint names and its ONNX export. `NetworkPlan.of(net)` reads the layers
off it once; `heads(plan, params, inputs)` then computes what `net.heads(inputs)` computes,
from a tuple of weight tensors in the network's flat order (policy head, trunk, value
head; `plan.unflatten` makes them views of one flat vector), with no module in the way:
a function torch.func can differentiate and torch.compile can trace without guarding on
module state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from agent.networks import ActorCritic, LayerNormNoParams

Params = tuple[torch.Tensor, ...]


class Layer(NamedTuple):
    """One layer: its kind, how many weight tensors it takes, and its settings."""

    kind: str  # conv | linear | layer_norm | leaky_relu | relu | flatten
    weights: int = 0
    stride: int = 1
    slope: float = 0.0


def _layers(module: nn.Module) -> tuple[Layer, ...]:
    layers: list[Layer] = []
    for child in (module if isinstance(module, nn.Sequential) else [module]):
        if isinstance(child, nn.Sequential):
            layers.extend(_layers(child))
        elif isinstance(child, nn.Conv2d):
            if child.padding != (0, 0) or child.dilation != (1, 1) or child.groups != 1 \
                    or child.stride[0] != child.stride[1]:
                raise ValueError(f"unsupported convolution {child}")
            layers.append(Layer("conv", len(list(child.parameters())), child.stride[0]))
        elif isinstance(child, nn.Linear):
            layers.append(Layer("linear", len(list(child.parameters()))))
        elif isinstance(child, LayerNormNoParams):
            layers.append(Layer("layer_norm"))
        elif isinstance(child, nn.LeakyReLU):
            layers.append(Layer("leaky_relu", slope=child.negative_slope))
        elif isinstance(child, nn.ReLU):
            layers.append(Layer("relu"))
        elif isinstance(child, nn.Flatten):
            layers.append(Layer("flatten"))
        elif not isinstance(child, nn.Identity):
            raise ValueError(f"no functional form for layer {type(child).__name__}")
    return tuple(layers)


def _apply(layers: Sequence[Layer], params: Params, x: torch.Tensor) -> torch.Tensor:
    at = 0
    for layer in layers:
        weights = params[at:at + layer.weights]
        at += layer.weights
        if layer.kind == "conv":
            x = F.conv2d(x, *weights, stride=layer.stride)
        elif layer.kind == "linear":
            x = F.linear(x, *weights)
        elif layer.kind == "layer_norm":
            x = F.layer_norm(x, x.shape[1:])
        elif layer.kind == "leaky_relu":
            x = F.leaky_relu(x, layer.slope)
        elif layer.kind == "relu":
            x = F.relu(x)
        else:  # flatten
            x = x.flatten(1)
    return x


@dataclass(frozen=True)
class NetworkPlan:
    """The layers of an ActorCritic and the shapes of its weights in the flat order."""

    trunk: tuple[Layer, ...]
    policy_head: tuple[Layer, ...]
    value_head: tuple[Layer, ...]
    shapes: tuple[tuple[int, ...], ...]  # of each weight tensor, in the flat order
    policy_head_count: int  # weight tensors of the policy head (first in the flat order)
    trunk_count: int  # ... of the trunk (next); the value head's come last
    shared_trunk: bool

    @staticmethod
    def of(net: ActorCritic) -> NetworkPlan:
        return NetworkPlan(_layers(net.trunk), _layers(net.policy_head),
                           _layers(net.value_head),
                           tuple(tuple(p.shape) for p in net.flat_order()),
                           len(list(net.policy_head.parameters())),
                           len(list(net.trunk.parameters())), net.shared_trunk)

    def _numel(self, tensors: slice) -> int:
        return sum(math.prod(shape) for shape in self.shapes[tensors])

    @property
    def size(self) -> int:
        """How many weights the network has."""
        return self._numel(slice(None))

    @property
    def policy_size(self) -> int:
        """Weights the policy's objective moves, first in the flat order: policy head and
        trunk."""
        return self._numel(slice(0, self.policy_head_count + self.trunk_count))

    @property
    def value_start(self) -> int:
        """Where the weights the value's objective moves (trunk and value head) begin."""
        return self._numel(slice(0, self.policy_head_count))

    def unflatten(self, flat: torch.Tensor) -> Params:
        """The weight tensors as views of one flat vector."""
        views, offset = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            views.append(flat[offset:offset + size].view(shape))
            offset += size
        return tuple(views)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def network_params(net: ActorCritic) -> torch.Tensor:
    """The network's weights as one flat vector in the flat order (a copy)."""
    return flatten([p.detach() for p in net.flat_order()])


def _features(plan: NetworkPlan, params: Params, inputs: torch.Tensor) -> torch.Tensor:
    start = plan.policy_head_count
    return _apply(plan.trunk, params[start:start + plan.trunk_count], inputs)


def policy_output(plan: NetworkPlan, params: Params, inputs: torch.Tensor) -> torch.Tensor:
    """The policy head's output (logits) on a batch of one preprocessed input."""
    features = _features(plan, params, inputs)
    return _apply(plan.policy_head, params[:plan.policy_head_count], features)[0]


def value_output(plan: NetworkPlan, params: Params, inputs: torch.Tensor) -> torch.Tensor:
    """V of a batch of one preprocessed input, shape ()."""
    features = _features(plan, params, inputs)
    return _apply(plan.value_head, params[plan.policy_head_count + plan.trunk_count:],
                  features)[0, 0]


def heads(plan: NetworkPlan, params: Params, inputs: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, value) of a batch of one preprocessed input: shapes (actions,) and ()."""
    features = _features(plan, params, inputs)
    logits = _apply(plan.policy_head, params[:plan.policy_head_count], features)
    value = _apply(plan.value_head, params[plan.policy_head_count + plan.trunk_count:],
                   features)
    return logits[0], value[0, 0]
