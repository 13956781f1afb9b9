"""An install of lit_sharp holds the callbacks and the configs inside the package (``lit_sharp.callbacks``,
``lit_sharp/configs``) and nothing generic at top level; a checkout and an editable install use the repository's
top-level ``callbacks/`` and ``configs/``; building prints no setuptools warning. Its Hydra launchers go into
Hydra's ``hydra_plugins`` namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "lit_sharp", "callbacks", "configs", "hydra_plugins")
#: What setuptools prints when package data lies in a folder the build does not know as a package.
SETUPTOOLS_WARNINGS = ("is absent from the `packages` configuration", "package init file", "BuildBackendWarning")


def _copy_sources(source: Path) -> Path:
    # A copy, so that the build leaves nothing in the checkout and no stale ``build/`` folder of an earlier layout
    # can leak into the wheel.
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    return source


def _pip_install(source: Path, target: Path, *editable: str) -> str:
    """``pip install`` into ``target`` (verbose, so that the build's own output shows); returns that output."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), *editable, str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def install_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A non-editable install of the checkout into a folder of its own, and what the install printed."""
    target = tmp_path_factory.mktemp("site")
    return target, _pip_install(_copy_sources(tmp_path_factory.mktemp("source")), target)


@pytest.fixture(scope="module")
def installed(install_log: tuple[Path, str]) -> Path:
    return install_log[0]


def test_install_puts_the_callbacks_inside_the_package_and_nothing_generic_at_top_level(installed: Path) -> None:
    top_level = {path.name for path in installed.iterdir() if not path.name.endswith(".dist-info")}
    # No top-level callbacks or configs; hydra_plugins is the namespace package where Hydra looks for launchers; ours take one folder of it.
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


def test_install_puts_every_config_inside_the_package(installed: Path) -> None:
    in_checkout = sorted(path.relative_to(REPO / "configs") for path in (REPO / "configs").rglob("*.yaml"))
    installed_configs = sorted(path.relative_to(installed / "lit_sharp" / "configs")
                               for path in (installed / "lit_sharp" / "configs").rglob("*.yaml"))  # fmt: skip
    assert len(in_checkout) > 20 and Path("train.yaml") in in_checkout
    assert installed_configs == in_checkout
    for relative in in_checkout:
        assert (installed / "lit_sharp" / "configs" / relative).read_bytes() == (REPO / "configs" / relative).read_bytes()


def test_every_config_folder_is_a_listed_package() -> None:
    # pyproject.toml lists each config group as a package: a folder it misses would ship without its YAML files
    # (and the build would warn).
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"lit_sharp.configs"} | {
        "lit_sharp.configs." + ".".join(folder.relative_to(REPO / "configs").parts)
        for folder in (REPO / "configs").rglob("*") if folder.is_dir() and folder.name != "__pycache__"
    }  # fmt: skip
    assert not folders - listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_the_install_prints_no_setuptools_warning(install_log: tuple[Path, str]) -> None:
    _, log = install_log
    assert "Successfully installed lit_sharp" in log
    printed = [line for line in log.splitlines() if any(warning in line for warning in SETUPTOOLS_WARNINGS)]
    assert not printed, printed


def test_installed_commands_find_the_configs_from_any_folder(installed: Path, tmp_path: Path) -> None:
    # Two documented commands, run where no checkout is near: both compose the installed configs.
    env = {**subprocess_env(), "PYTHONPATH": str(installed)}
    status = subprocess.run([sys.executable, "-m", "lit_sharp.grid", "status", "smoke", f"paths.root={tmp_path}"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert status.returncode == 0, status.stderr[-2000:]
    assert "grid smoke: 4 runs" in status.stdout and "pending    4" in status.stdout
    composed = subprocess.run([sys.executable, "-m", "lit_sharp", "--cfg", "job", "experiment=quickstart"],
                              cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "name: quickstart" in composed.stdout


def test_an_editable_install_uses_the_top_level_configs(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    source = _copy_sources(tmp_path / "source")
    log = _pip_install(source, tmp_path / "site", "--editable")
    printed = [line for line in log.splitlines() if any(warning in line for warning in SETUPTOOLS_WARNINGS[:2])]
    assert not printed, printed
    # The install's .pth files hook in only from a site folder: add it first, so that its finder answers before that
    # of any other editable install of lit_sharp in this environment.
    code = (
        f"import site, sys; site.addsitedir({str(tmp_path / 'site')!r}); site.main()\n"
        "import lit_sharp, lit_sharp.config as config\n"
        "print(lit_sharp.__file__); print(config.CONFIG_DIR)\n"
    )
    env = {key: value for key, value in subprocess_env().items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    package_file, config_dir = done.stdout.split()
    assert Path(package_file) == source / "lit_sharp" / "__init__.py"  # this install answered
    # setuptools' editable finder cannot import a folder mapped under a regular package unless it holds an
    # __init__.py; Hydra wants a directory anyway, which the package finds beside itself.
    assert Path(config_dir) == source / "configs"
    assert not (source / "lit_sharp" / "configs").exists()


def test_a_checkout_on_the_path_finds_its_own_configs_folder(tmp_path: Path) -> None:
    code = "import lit_sharp.config as config; print(config.CONFIG_DIR)"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                          check=True, capture_output=True, text=True)  # fmt: skip
    assert Path(done.stdout.strip()) == REPO / "configs"
