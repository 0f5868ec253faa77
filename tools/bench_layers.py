"""Per-layer cost of a network's convolutions under each kernel choice torch offers.

    python tools/bench_layers.py [--network shared-conv] [--repeat 200]

For each convolution of the network (batch 1, 1 thread, Breakout-sized input), the best
of three timings of its forward pass alone and of its forward plus the backward pass the
learner needs (weight gradients, and input gradients past the first layer), with oneDNN
(mkldnn) on and off, in contiguous and channels-last memory formats. Prints one JSON
object. It answers whether choosing the kernel or the layout per layer could pay.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit

import torch
from torch import nn

from agent.networks import build_network


def _time(call: object, repeat: int) -> float:
    return round(min(timeit.repeat(call, number=repeat, repeat=3)) / repeat * 1e6, 1)


def _measure(conv: nn.Conv2d, x_in: torch.Tensor, wanted: list[torch.Tensor],
             repeat: int) -> dict[str, float]:
    def forward() -> None:
        with torch.no_grad():
            conv(x_in)

    def forward_backward() -> None:
        out = conv(x_in)
        torch.autograd.grad(out, wanted, torch.ones_like(out))
    forward_backward()  # warm-up: oneDNN primitive caches
    return {"forward_us": _time(forward, repeat),
            "forward_backward_us": _time(forward_backward, repeat)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", default="shared-conv",
                        choices=["shared-conv", "shared-stream", "stream"])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_network(args.network, (4, 84, 84), 4, hidden_size=256, sparsity=0.9,
                        normalize=False)
    # Each convolution with the input it sees in the network.
    layers: list[tuple[nn.Conv2d, torch.Tensor]] = []
    modules = net.trunk if net.shared_trunk else net.policy_head
    x = torch.rand(1, 4, 84, 84)
    with torch.no_grad():
        for module in modules:
            if isinstance(module, nn.Conv2d):
                layers.append((module, x.clone()))
            x = module(x)
    results = []
    mkldnn = torch.backends.mkldnn.enabled
    try:
        for index, (conv, inputs) in enumerate(layers):
            row: dict[str, object] = {"layer": index, "shape": list(conv.weight.shape),
                                      "input": list(inputs.shape[1:])}
            for onednn in (True, False):
                for layout in ("contiguous", "channels_last"):
                    torch.backends.mkldnn.enabled = onednn
                    fmt = torch.channels_last if layout == "channels_last" \
                        else torch.contiguous_format
                    x_in = inputs.contiguous(memory_format=fmt).requires_grad_(index > 0)
                    wanted = [conv.weight, conv.bias] + ([x_in] if index > 0 else [])
                    key = f"{'onednn' if onednn else 'native'}-{layout}"
                    row[key] = _measure(conv, x_in, wanted, args.repeat)
            results.append(row)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    print(json.dumps({"network": args.network, "layers": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
