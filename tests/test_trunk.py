"""The one-pass backward of a shared conv trunk equals autograd's two passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from agent.config import AgentConfig
from agent.learner import A2CLearner, Transition
from agent.networks import build_network
from agent.trunk import SharedTrunkGrads, supports


def test_both_trunk_gradients_match_two_autograd_passes() -> None:
    torch.manual_seed(0)
    net = build_network("seed", (4, 44, 44), 4, hidden_size=8, sparsity=0.9, normalize=True)
    inputs = net.preprocess(torch.randint(0, 255, (1, 4, 44, 44), dtype=torch.uint8))
    params = list(net.trunk.parameters())
    features = net.trunk(inputs)
    cotangents = torch.randn(2, features.shape[1])
    expected = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        features, params, grad_outputs=c[None], retain_graph=True)]) for c in cotangents]

    grads = SharedTrunkGrads(net.trunk)
    trunk_pass = grads.forward(inputs)
    assert torch.equal(trunk_pass.output.flatten(1), features.detach())
    out = (torch.empty(expected[0].numel()), torch.empty(expected[0].numel()))
    grads.backward(trunk_pass, cotangents, out)
    for mine, theirs in zip(out, expected, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7)
        assert theirs.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("trunk", [
    nn.Sequential(nn.Conv2d(4, 8, 3), nn.LeakyReLU(), nn.Flatten()),
    nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten()),
    nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()),
    nn.Linear(4, 4),
])
def test_other_trunks_are_left_to_autograd(trunk: nn.Module) -> None:
    assert not supports(trunk)
    with pytest.raises(ValueError):
        SharedTrunkGrads(trunk)


def test_the_learner_updates_as_with_two_autograd_passes() -> None:
    """The default learner (ObGD over the seed net's shared trunk) gives the same weights
    with the one-pass trunk backward as with autograd's two passes."""
    config = AgentConfig(network="seed")
    shape = (4, 44, 44)
    one_pass, two_pass = (A2CLearner(config, shape, 4, seed=0) for _ in range(2))
    assert one_pass._trunk_grads is not None
    two_pass._trunk_grads = None  # the autograd path
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(31)]
    for step in range(30):
        transition = Transition(frames[step], int(rng.integers(4)), float(rng.normal()),
                                frames[step + 1], step % 11 == 10, False)
        for learner in (one_pass, two_pass):
            learner.act(frames[step])
            learner.update(transition)
    assert torch.allclose(one_pass.net.flat, two_pass.net.flat, rtol=1e-4, atol=1e-6)
    assert not torch.equal(one_pass.net.flat, A2CLearner(config, shape, 4, seed=0).net.flat)
