"""The runtime around the learner.

This package itself is the device side: sensor streams, video, metrics files and small
helpers, with the subpackage `runtime.device` (loading, playing and following exported
policies) and its command line `runtime.infer`. It imports numpy, onnxruntime and
gymnasium, never torch, onnx or `agent` (import-linter contracts in pyproject.toml). The
learner side, which does import torch, is the subpackage `runtime.daemon`.
"""
