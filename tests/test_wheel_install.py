"""A non-editable install has everything nano reads at run time: the wheel built from this checkout, installed
into a fresh virtual environment, runs from a folder outside the repo and finds the shipped model profiles, GPU
profiles and recipes (package data under ``nanocli/profiles/``).

Nothing is downloaded: the wheel is built without build isolation (the running environment's setuptools) and
installed with ``--no-deps --no-index``; the fresh environment sees the running one's dependencies (torch, typer,
...) through a ``.pth`` file that lists its site-packages as plain path entries. A plain entry does not run the
``.pth`` files inside that folder, so the running environment's editable nano (a finder installed by a ``.pth``)
stays invisible there: the test checks that nano is not importable before the wheel goes in, and that it comes
from the fresh environment after.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from nanocli_model import row_gemv

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "nanocli", "nanocli_model")  # what the wheel is built from

pytestmark = pytest.mark.slow


def _run(args: list, cwd: Path, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh environment's bin/, the environment to run it with, a working folder outside the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NANO_PROFILES_DIR", "PYTHONHOME")}
    env.update(COLUMNS="100", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    # Build from a copy of the checkout's sources, so no build/ or *.egg-info lands in the repo (and none left
    # there by an earlier build can add stale files to this wheel).
    src = root / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", root / "dist", src], cwd=root, env=env, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((root / "dist").glob("nano-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root, env=env)
    deps = [p for p in dict.fromkeys(site.getsitepackages()) if Path(p).is_dir()]
    Path(purelib.stdout.strip(), "running-env-deps.pth").write_text("\n".join(deps) + "\n", encoding="utf-8")

    before = _run([python, "-c", "import nanocli"], cwd=root, env=env)
    assert before.returncode != 0 and "No module named 'nanocli'" in before.stderr, (
        "the running environment's nano is importable in the fresh one: the test would not test the wheel")
    install = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--ignore-installed", "-q", wheels[0]], cwd=root, env=env, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    away = root / "elsewhere"
    away.mkdir()
    return venv / "bin", env, away


def test_nano_comes_from_the_installed_wheel(installed):
    bin_dir, env, away = installed
    where = _run([bin_dir / "python", "-c", "import nanocli, nanocli.profiles as p; print(nanocli.__file__); "
                  "print(p.profiles_dir())"], cwd=away, env=env)
    assert where.returncode == 0, where.stderr
    module, profiles = where.stdout.split()
    venv = bin_dir.parent.resolve()
    assert Path(module).resolve().is_relative_to(venv) and Path(profiles).resolve().is_relative_to(venv)
    assert not Path(module).resolve().is_relative_to(ROOT)


def test_the_kernel_sources_ship_and_are_found(installed):
    """nano's CPU decode kernels are compiled from C++ files at first use: the wheel carries them."""
    bin_dir, env, away = installed
    result = _run([bin_dir / "python", "-c", "import sys; from nanocli_model import row_gemv; print(*(p.is_file() and "
                   "p.resolve().is_relative_to(sys.prefix) for p in row_gemv.SOURCES))"], cwd=away, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * len(row_gemv.SOURCES)  # every source this tree has


def test_profiles_lists_the_shipped_models_and_gpus(installed):
    bin_dir, env, away = installed
    result = _run([bin_dir / "nano", "profiles"], cwd=away, env=env)
    assert result.returncode == 0, result.stderr
    shipped = sorted(p.stem for p in (ROOT / "nanocli" / "profiles" / "models").glob("*.yaml"))
    assert shipped and all(name in result.stdout for name in shipped)
    assert "a10g" in result.stdout and "19.66" in result.stdout and "t4" in result.stdout  # GiB in the caption


def test_fit_check_finds_the_model_and_gpu_profiles(installed):
    bin_dir, env, away = installed
    result = _run([bin_dir / "nano", "fit-check", "--model", "nemotron-nano-9b-v2", "--gpu", "a10g"], cwd=away,
                  env=env)
    assert result.returncode == 0, result.stderr
    assert "FITS: the model needs 19.09 GiB of 19.66 GiB" in " ".join(result.stdout.split())


def test_a_recipe_and_a_model_profile_resolve_by_name(installed):
    bin_dir, env, away = installed
    # --dry-run resolves the recipe (pretrain-tiny names the tiny profile) and prints the plan, writing nothing
    plan = _run([bin_dir / "nano", "pretrain", "--recipe", "pretrain-tiny", "--out", away / "run", "--dry-run"],
                cwd=away, env=env)
    assert plan.returncode == 0, plan.stderr
    text = " ".join(plan.stdout.split())
    assert "plan (dry run)" in text and "profile tiny (331K parameters)" in text
    assert "wsd: lr 3.00e-03" in text  # the recipe's schedule, not the defaults
    assert not (away / "run").exists()
    info = _run([bin_dir / "nano", "info", "tiny"], cwd=away, env=env)
    assert info.returncode == 0 and info.stdout.startswith("tiny: "), info.stderr
    unknown = _run([bin_dir / "nano", "pretrain", "--recipe", "no-such-recipe", "--out", away / "x", "--dry-run"],
                   cwd=away, env=env)
    assert unknown.returncode == 2 and "available: demo, demo-smoke" in unknown.stderr
