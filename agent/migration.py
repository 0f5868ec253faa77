"""Reading learner state written by earlier versions: the one place that knows old formats.

Checkpoints of long runs must go on after an upgrade, so each former layout is turned
into today's here, at load time, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import torch

from agent.networks import ActorCritic


def flat_adam_state(state: dict[str, Any], net: ActorCritic) -> dict[str, Any]:
    """Adam's state dict with one flat parameter in the network's flat order (policy head,
    trunk, value head), as the learner saves it. Checkpoints written before Adam ran on
    one flat buffer hold one entry per weight tensor, in `net.parameters()` order: they
    are re-laid into the flat order. A state of any other shape is returned as it is, for
    the size checks of the loader to name."""
    per_tensor = state["param_groups"][0]["params"]
    params = list(net.parameters())
    if len(per_tensor) == 1 or len(per_tensor) != len(params):
        return state
    offsets, offset = {}, 0
    for param in net.flat_order():
        offsets[param] = offset
        offset += param.numel()
    merged = {"exp_avg": torch.zeros(offset), "exp_avg_sq": torch.zeros(offset)}
    step = torch.zeros(())
    for index, param in zip(per_tensor, params, strict=True):
        entry = state["state"].get(index)
        if entry is None:
            continue
        start = offsets[param]
        for key, merged_tensor in merged.items():
            merged_tensor[start:start + param.numel()] = entry[key].reshape(-1)
        step = entry["step"]
    group = {**state["param_groups"][0], "params": [0]}
    return {"state": {0: {"step": step, **merged}}, "param_groups": [group]}
