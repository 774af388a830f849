"""The installable package: a wheel built from the tree holds every module and the data the
commands read, and the installed copy runs outside the source tree.

The wheel is installed without dependencies into a folder put first on ``PYTHONPATH`` (the
test environment already has them), and run from a directory outside the repository, so the
check is of the wheel's files, not of the editable install beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixdq_jax", "pallas_kernels", "weights_convert")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = out / "build"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(build)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    (found,) = build.glob("mixdq_jax-*.whl")
    return found


def _source_files() -> set[str]:
    """Every tracked file the packages ship: modules and package data."""
    listed = subprocess.run(
        ["git", "ls-files", *PACKAGES], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    return {p for p in listed if not p.endswith((".md",)) and "/__pycache__/" not in p}


def test_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_files() - names)
    assert not missing, f"files of the tree not in the wheel: {missing[:10]}"
    assert "mixdq_jax/testbed/assets/testbed/unet/diffusion_pytorch_model.safetensors" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mixdq = mixdq_jax.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not [n for n in names if n.startswith("tests/")]


def test_installed_wheel_runs_outside_the_tree(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
         str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = run("-c", "import mixdq_jax, mixdq_jax.testbed as t; print(mixdq_jax.__file__); "
                "print(t.testbed_path())")  # fmt: skip
    module, assets = where.split()
    assert Path(module).is_relative_to(target) and Path(assets).is_relative_to(target)
    version = run("-m", "mixdq_jax.cli", "--version").strip()
    assert version.startswith("mixdq-jax ") and "unknown" not in version
    # a command that reads the shipped testbed model from the installed copy
    layers = run("-m", "mixdq_jax.cli", "layers", "--model", "testbed", "--format", "json")
    assert '"conv_in"' in layers
