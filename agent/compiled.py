"""Compiling the learner's pure functions once per process, with an eager fallback.

torch.compile (inductor) turns each function into one graph of fused C++ kernels around
the convolutions and matrix products, instead of hundreds of operations dispatched one by
one from Python. Inductor keeps what it builds in an on-disk cache, so a restarted daemon
loads its graphs instead of building them again; the cache lives under the user's cache
directory (not /tmp, which a reboot may clear) unless TORCHINDUCTOR_CACHE_DIR says where.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
    / "stream-agent-runtime" / "torchinductor"
# Before torch._dynamo is imported: importing it settles inductor's cache directory.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

log = logging.getLogger(__name__)


def failure_reason(exc: BaseException) -> str:
    """One line for a compiler failure: its root cause, named by type. Dynamo wraps the
    backend's error in its own ("backend='inductor' raised:"), whose first line says
    nothing; the cause says what happened (a compile worker killed by Ctrl-C, say)."""
    root, seen = exc, {id(exc)}
    while (root.__cause__ or root.__context__) is not None \
            and id(root.__cause__ or root.__context__) not in seen:
        root = root.__cause__ or root.__context__
        seen.add(id(root))
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0][:200]}" if lines else type(root).__name__


def c_compiler() -> str | None:
    """The C++ compiler inductor would use, or None when the machine has none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


class Compiled:
    """`fn` compiled on its first call (fullgraph: any Python the graph would break on is
    an error here, not a silent slowdown), or `fn` itself where compiling is off, the
    machine has no C++ compiler, or compiling fails; each fallback says why in one log
    line. `compile_seconds` is how long the first call took to compile and run."""

    def __init__(self, fn: Callable, name: str, enabled: bool) -> None:
        self.name = name
        self.eager = fn
        self.compile_seconds: float | None = None
        self._call: Callable = fn
        if enabled and torch._dynamo.config.disable:
            log.info("%s: torch.compile is disabled (TORCH_COMPILE_DISABLE=1): running "
                     "eagerly", name)
            enabled = False
        if enabled and c_compiler() is None:
            log.info("%s: no C++ compiler on this machine (CXX, g++, c++ or clang++): "
                     "running eagerly", name)
            enabled = False
        self.enabled = enabled
        if enabled:
            self._compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            self._call = self._first

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)

    def _first(self, *args: Any) -> Any:
        """The first call compiles (or loads from the cache); later calls go straight
        to the compiled function."""
        start = time.perf_counter()
        try:
            result = self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back
            log.warning("%s: compiling failed (%s): running eagerly", self.name,
                        failure_reason(exc))
            self.enabled = False
            self._call = self.eager
            return self.eager(*args)
        self.compile_seconds = time.perf_counter() - start
        log.info("%s: compiled in %.1f s (cache: %s)", self.name, self.compile_seconds,
                 os.environ["TORCHINDUCTOR_CACHE_DIR"])
        self._call = self._compiled
        return result

