"""An install of lit_sharp holds the callbacks as ``lit_sharp.callbacks`` and no top-level ``callbacks``; its Hydra
launchers go into Hydra's ``hydra_plugins`` namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "lit_sharp", "callbacks", "hydra_plugins")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-editable install of the checkout into a folder of its own.

    Built from a copy of the sources, so that the build leaves nothing in the checkout and no stale ``build/``
    folder of an earlier layout can leak into the wheel.
    """
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return target


def test_install_puts_the_callbacks_inside_the_package_and_nothing_generic_at_top_level(installed: Path) -> None:
    top_level = {path.name for path in installed.iterdir() if not path.name.endswith(".dist-info")}
    # hydra_plugins is the namespace package where Hydra looks for launchers; ours take one folder of it.
    assert top_level == {"lit_sharp", "hydra_plugins"}
    assert [path.name for path in (installed / "hydra_plugins").iterdir()] == ["lit_sharp_launchers"]
    assert not (installed / "hydra_plugins" / "__init__.py").exists()  # a namespace, shared with Hydra's plugins
    installed_callbacks = {path.name for path in (installed / "lit_sharp" / "callbacks").glob("*.py")}
    assert installed_callbacks == {path.name for path in (REPO / "callbacks").glob("*.py")}


def test_install_holds_every_subpackage_of_the_checkout(installed: Path) -> None:
    # pyproject.toml lists the packages by hand (discovery cannot follow the callbacks mapping): a new subpackage
    # must be added there.
    in_checkout = {init.parent.relative_to(REPO) for init in (REPO / "lit_sharp").rglob("__init__.py")}
    missing = sorted(str(folder) for folder in in_checkout if not (installed / folder / "__init__.py").is_file())
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_installed_callbacks_import_from_anywhere(installed: Path, tmp_path: Path) -> None:
    code = (
        "import sys, lit_sharp, lit_sharp.callbacks.sharpness as module\n"
        "from lit_sharp.callbacks import AdaptiveSharpness, CorruptionError, FinalErrors\n"
        "assert module.AdaptiveSharpness is AdaptiveSharpness\n"
        "print(lit_sharp.__file__); print(module.__file__)\n"
        "print(any(type(finder).__name__ == '_CheckoutCallbacks' for finder in sys.meta_path))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(installed)},
                          check=True, capture_output=True, text=True)  # fmt: skip
    package_file, module_file, checkout_finder = done.stdout.split()
    assert Path(package_file) == installed / "lit_sharp" / "__init__.py"
    assert Path(module_file) == installed / "lit_sharp" / "callbacks" / "sharpness.py"
    assert checkout_finder == "False"  # an install needs no help to find its callbacks


def test_a_checkout_on_the_path_finds_its_own_callbacks_folder(tmp_path: Path) -> None:
    # Found, not imported: the import itself is the other tests' business, and Lightning takes seconds to load.
    code = "import importlib.util; print(importlib.util.find_spec('lit_sharp.callbacks.sharpness').origin)"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                          check=True, capture_output=True, text=True)  # fmt: skip
    assert Path(done.stdout.strip()) == REPO / "callbacks" / "sharpness.py"
