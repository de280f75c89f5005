"""Makes this checkout's `benchmarks` and `tests` folders importable by their package names
without putting the checkout's root on sys.path.

The root also holds `kernels/`, `proto/` and `services/`, which must never shadow the installed
distributions (Hugging Face's `kernels`, proto-plus's `proto`) or the installed `pagemesh`. Run a
benchmark as `python benchmarks/NAME.py`: Python puts benchmarks/ (not the root) on sys.path, the
script imports this module first, and everything of pagemesh comes from the installed package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def register_package(name: str) -> None:
    """Imports the root's folder `name` as the package `name` (no other name is mapped)."""
    if name in sys.modules:
        return
    folder = ROOT / name
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def launcher(code: str) -> list[str]:
    """`python -P -c` running `code` after registering the packages (for worker processes)."""
    prelude = (
        "import importlib.util, sys\n"
        f"s = importlib.util.spec_from_file_location('_repo', {str(Path(__file__))!r})\n"
        "m = sys.modules['_repo'] = importlib.util.module_from_spec(s)\n"
        "s.loader.exec_module(m)\n"
        "m.register_package('benchmarks'); m.register_package('tests')\n"
    )
    return [sys.executable, "-P", "-c", prelude + code]


register_package("benchmarks")
register_package("tests")
