"""`import diffkd` refuses a foreign top-level `kernels` package (Hugging Face's has the same name), clearly."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

import kernels
from diffkd import _kernels_check

REPO = Path(__file__).resolve().parents[1]


def test_diffkd_accepts_its_own_kernels_package():
    assert kernels.__diffkd_kernels__ is True
    assert Path(kernels.__file__).resolve().parent.parent == Path(_kernels_check.__file__).resolve().parents[1]
    _kernels_check.check_kernels_package()


def test_a_foreign_kernels_package_first_on_the_path_fails_import_diffkd(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text('"""Stands in for Hugging Face\'s kernels package."""\n'
                                         "def get_kernel(name):\n    return name\n")
    script = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import diffkd"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: diffkd: 'import kernels' found a package at")
    assert str(foreign / "__init__.py") in message
    assert "Hugging Face" in message and "pip uninstall kernels" in message and "own virtual environment" in message


def test_a_foreign_kernels_package_that_fails_to_import_is_named(monkeypatch, tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.delitem(sys.modules, "kernels")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="found another package at .*failed to import.*pip uninstall kernels"):
        _kernels_check.check_kernels_package()


def test_an_already_imported_foreign_kernels_module_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels", types.ModuleType("kernels"))
    with pytest.raises(ImportError, match="not diffkd's Triton kernels"):
        _kernels_check.check_kernels_package()
