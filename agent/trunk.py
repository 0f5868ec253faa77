"""Both gradients of a shared convolutional trunk from one backward pass.

ObGD keeps separate policy and value traces, so over a shared trunk it needs two
gradients of it: of -log pi (plus the signed entropy) and of -V. Autograd gives them
with two backward passes through every convolution. Here the trunk runs forward once
without a graph, keeping its activations, and one hand-written backward pass carries
both cotangents at once: the input gradient of each layer as one batch of two, and the
weight gradient of each layer as one call whose output channels are the two cotangents
side by side (a weight gradient is per output channel, so stacking the cotangents along
the channels yields the two weight gradients stacked along the rows). Same arithmetic,
half the kernel launches and larger kernels: see tools/bench_throughput.py.

Only trunks built from Conv2d, ReLU and Flatten qualify (`supports`); anything else
keeps autograd's two passes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight


class TrunkPass(NamedTuple):
    """One graph-free forward pass: each convolution's input, and the trunk's output."""

    inputs: list[torch.Tensor]   # inputs[i] is what convolution i saw
    output: torch.Tensor         # after the last ReLU, before Flatten


def supports(trunk: nn.Module) -> bool:
    """A Sequential of (Conv2d, ReLU) pairs ending in Flatten."""
    if not isinstance(trunk, nn.Sequential) or len(trunk) < 3 or len(trunk) % 2 == 0:
        return False
    layers = list(trunk)
    pairs_ok = all(isinstance(conv, nn.Conv2d) and isinstance(act, nn.ReLU)
                   and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding == (0, 0)
                   and conv.bias is not None
                   for conv, act in zip(layers[:-1:2], layers[1:-1:2], strict=True))
    return pairs_ok and isinstance(layers[-1], nn.Flatten)


class SharedTrunkGrads:
    """forward() once per observation; backward() with the two cotangents of the trunk's
    output gives two flat gradients in trunk.parameters() order."""

    def __init__(self, trunk: nn.Sequential) -> None:
        if not supports(trunk):
            raise ValueError("the trunk is not a plain Conv2d/ReLU stack")
        self.convs: list[nn.Conv2d] = [m for m in trunk if isinstance(m, nn.Conv2d)]
        self.offsets, offset = [], 0  # where each convolution's weight starts, flat
        for conv in self.convs:
            self.offsets.append(offset)
            offset += conv.weight.numel() + conv.out_channels

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> TrunkPass:
        seen, h = [], inputs
        for conv in self.convs:
            seen.append(h)
            h = F.relu(conv(h))
        return TrunkPass(seen, h)

    @torch.no_grad()
    def backward(self, trunk_pass: TrunkPass, cotangents: torch.Tensor,
                 out: tuple[torch.Tensor, torch.Tensor]) -> None:
        """cotangents: (2, features) at the flattened output. Writes the gradient for
        cotangent k into out[k] (flat, trunk.parameters() order: w1, b1, w2, b2, ...)."""
        grad = cotangents.view(2, *trunk_pass.output.shape[1:])
        # ReLU's derivative: where its output is positive (the input of the next layer).
        outputs = [*trunk_pass.inputs[1:], trunk_pass.output]
        for index in reversed(range(len(self.convs))):
            conv, seen = self.convs[index], trunk_pass.inputs[index]
            grad = grad * (outputs[index] > 0)
            channels = conv.out_channels
            weight_grads = conv2d_weight(
                seen, (2 * channels, *conv.weight.shape[1:]),
                grad.reshape(1, 2 * channels, *grad.shape[2:]), stride=conv.stride)
            bias_grads = grad.sum(dim=(2, 3))
            start, size = self.offsets[index], conv.weight.numel()
            for k in range(2):
                out[k][start:start + size] = weight_grads[k * channels:(k + 1) * channels]\
                    .reshape(-1)
                out[k][start + size:start + size + channels] = bias_grads[k]
            if index > 0:  # the observation itself needs no gradient
                grad = conv2d_input((2, *seen.shape[1:]), conv.weight, grad, stride=conv.stride)
