"""The repository's command-line tools, by purpose. Here, the product tools a user is told
to run: `export_onnx` (a checkpoint's actor to ONNX), `archive_run` (a run kept in docs/runs
and restored), `device_check` (the torch-free runtime on an emulated aarch64 device, with
its pieces `device_probe`, `device_emulator` and `device_wheel`) and `stream-agent.service`
(the systemd unit). `tools.bench` holds the speed, cost and robustness benchmarks,
`tools.research` the learning experiments: sweeps, comparisons, plots, the reference learner.

Each module is a script (`python tools/export_onnx.py ...`, `python tools/research/sweep.py
...`, as the README and docs/ give them) and a module the others and the tests import
(`from tools.research import seed_stats`).

`tools` is importable from anywhere after `pip install -e .`, which maps it beside `agent`
and `runtime`; it is left out of every built wheel (setup.py says why). The tools work on a
checkout: they read its config.yaml, presets/ and tests/data and write under its runs/.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository checkout the tools belong to."""
