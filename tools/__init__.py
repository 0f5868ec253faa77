"""The repository's command-line tools: export, benchmarks, sweeps, plots, the kill soak and
the device check. Each module is a script (`python tools/sweep.py ...`, as the README gives
them) and a module the others and the tests import (`from tools import seed_stats`).

`tools` is importable from anywhere after `pip install -e .`, which maps it beside `agent`
and `runtime`; it is left out of every built wheel (setup.py says why). The tools work on a
checkout: they read its config.yaml, presets/ and tests/data and write under its runs/.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository checkout the tools belong to."""
