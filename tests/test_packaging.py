"""A non-editable install carries the kernels and runs: build the wheel, check that every kernel
source is inside it, and run the info command from the unpacked wheel, outside the repo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("softmax_kernels-*.whl")
    return whl


def test_wheel_carries_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p for p in (ROOT / "kernels").rglob("*") if p.suffix in (".cu", ".cuh", ".py")]
    assert sources, "no kernel sources found in kernels/"
    for p in sources:
        rel = "softmax_kernels/kernels/" + p.relative_to(ROOT / "kernels").as_posix()
        assert rel in names, f"{rel} is missing from the wheel"


def test_unpacked_wheel_imports_and_runs(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import numpy as np, softmax_kernels as sk\n"
        f"assert sk.__file__.startswith({str(site)!r}), sk.__file__\n"
        "print(sk.softmax(np.array([0.0, 0.0])))\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0.5 0.5]"
    r = subprocess.run([sys.executable, "-m", "softmax_kernels", "info"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "softmax-kernels" in r.stdout and "numpy   available" in r.stdout


def test_wheel_has_license_and_types(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    assert "softmax_kernels/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Project-URL: Documentation" in meta


def test_sdist_carries_the_package_not_the_tests(tmp_path):
    import tarfile

    code = (
        "import sys; from setuptools import build_meta\n"
        f"print(build_meta.build_sdist({str(tmp_path)!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (sdist,) = tmp_path.glob("softmax_kernels-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for need in ("LICENSE", "README.md", "pyproject.toml", "docs/api.md",
                 "kernels/cuda/softmax.cu", "python/softmax_kernels/py.typed"):  # fmt: skip
        assert need in names, need
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
