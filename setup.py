"""`tools` in editable installs only: pyproject.toml holds everything else.

`pip install -e .` maps `tools` (and its subpackages `tools.bench`, `tools.research`) beside
`agent` and `runtime`, so `python tools/export_onnx.py` or `python tools/research/sweep.py`
(where sys.path[0] is tools/ or tools/research/, not the repository) and the tests can
`from tools import ...`. A built wheel (README "Device install": `pip wheel .`) leaves it
out: the tools run only on a checkout (its config.yaml, presets/, runs/), most of them need
torch, and a top-level package called `tools` in site-packages would clash with any other
distribution that ships one (setuptools' own package discovery refuses the name for that
reason).
"""

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

TOOLS = ["tools", "tools.bench", "tools.research"]


class EditableWithTools(editable_wheel):
    """The editable install's packages: those of pyproject.toml, and `tools` with its own."""

    def run(self) -> None:
        self.distribution.packages = [*(self.distribution.packages or []), *TOOLS]
        super().run()


setup(cmdclass={"editable_wheel": EditableWithTools})
