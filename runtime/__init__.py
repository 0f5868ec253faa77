"""The runtime around the learner.

This package itself is the device side: sensor streams, the torch-free inference runtime,
video, metrics files and small helpers. It imports numpy, onnxruntime and gymnasium, never
torch, onnx or `agent` (import-linter contracts in pyproject.toml). The learner side, which
does import torch, is the subpackage `runtime.daemon`.
"""
