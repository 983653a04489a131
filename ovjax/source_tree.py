"""Running from a source tree without `pip install` (e.g. the GPU machine): the folders `kernels/` and
`configs/` are mapped to `ovjax.kernels` / `ovjax.configs` by pyproject only when installed, so map them here."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def map_folder(name: str) -> None:
    """Make `ovjax.<name>` importable from ROOT/<name> unless it already is (installed or mapped)."""
    import ovjax

    full = f"ovjax.{name}"
    try:
        importlib.import_module(full)
        return
    except ModuleNotFoundError as e:
        if e.name != full:
            raise
    spec = importlib.util.spec_from_file_location(full, ROOT / name / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / name)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    setattr(ovjax, name, module)
