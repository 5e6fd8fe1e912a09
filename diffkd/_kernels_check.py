"""diffkd's Triton ops live in a top-level package named ``kernels``, the name of Hugging Face's popular
``kernels`` package too.  When another ``kernels`` shadows ours, ``import diffkd`` fails here, naming the clash
and the fix, instead of failing later with an unrelated AttributeError.  Runs before diffkd imports anything else.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

MARKER = "__diffkd_kernels__"  # set by diffkd's own kernels/__init__.py
_FIX = ("Hugging Face's `kernels` package has the same top-level name. Fix: run `pip uninstall kernels` and "
        "then reinstall diffkd (`pip install --force-reinstall --no-deps diffkd`, or `pip install -e .` from a "
        "source checkout), or install diffkd in its own virtual environment. If the package found is a folder "
        "of yours, rename it or take its parent off sys.path.")


def _location(module_or_spec) -> str:
    origin = getattr(module_or_spec, "origin", None) or getattr(module_or_spec, "__file__", None)
    return str(origin) if origin else "an unknown location"


def _is_next_to_diffkd(spec) -> bool:
    """diffkd's own kernels package sits beside diffkd/ (in site-packages or in a source checkout)."""
    if spec is None or not spec.origin:
        return False
    return Path(spec.origin).resolve().parent.parent == Path(__file__).resolve().parent.parent


def check_kernels_package() -> None:
    """Raises ImportError, naming the clash and the fix, unless ``import kernels`` gives diffkd's package."""
    module = sys.modules.get("kernels")
    if module is None:
        spec = importlib.util.find_spec("kernels")
        if spec is None:
            raise ImportError("diffkd: its 'kernels' package is missing; reinstall diffkd "
                              "(`pip install --force-reinstall --no-deps diffkd`, or `pip install -e .` from a "
                              "source checkout)")
        try:
            module = importlib.import_module("kernels")
        except Exception as error:
            if _is_next_to_diffkd(spec):
                raise  # ours, broken for another reason: its own error says more
            raise ImportError(f"diffkd: 'import kernels' found another package at {_location(spec)}, which failed "
                              f"to import ({type(error).__name__}: {error}). {_FIX}") from error
    if getattr(module, MARKER, False) is not True:
        raise ImportError(f"diffkd: 'import kernels' found a package at {_location(module)} that is not diffkd's "
                          f"Triton kernels (it lacks kernels.{MARKER}). {_FIX}")
