"""The git_commit lineage tag: a real git repository here, the images' baked-in commit, and what
``make images`` passes (``make -n``: no Docker engine runs here)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ple_adatt.artifacts import git_commit

ROOT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch) -> tuple[Path, str]:
    monkeypatch.delenv("PLE_ADATT_GIT_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "model.py").write_text("x = 1\n")
    _git(tmp_path, "add", "model.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path, _git(tmp_path, "rev-parse", "HEAD")


def test_a_clean_tree_records_head_and_untracked_files_do_not_count(repo):
    path, head = repo
    assert git_commit(path) == head
    (path / "notes.txt").write_text("scratch\n")  # untracked
    assert git_commit(path) == head


@pytest.mark.parametrize("staged", [False, True], ids=["modified", "staged"])
def test_a_modified_tracked_file_records_the_commit_as_dirty(repo, staged):
    path, head = repo
    (path / "model.py").write_text("x = 2\n")
    if staged:
        _git(path, "add", "model.py")
    assert git_commit(path) == f"{head}-dirty"
    _git(path, "commit", "-q", "-am", "second")
    assert git_commit(path) == _git(path, "rev-parse", "HEAD")  # committed: clean again


def test_the_images_commit_wins_and_no_repository_is_none(repo, tmp_path_factory, monkeypatch):
    path, _ = repo
    monkeypatch.setenv("PLE_ADATT_GIT_COMMIT", "0123abc-dirty")
    assert git_commit(path) == "0123abc-dirty"
    monkeypatch.setenv("PLE_ADATT_GIT_COMMIT", "")  # the images' default when built without GIT_COMMIT
    outside = tmp_path_factory.mktemp("no-git")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(outside.parent))
    assert git_commit(outside) is None


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_the_images_bake_in_the_commit_they_were_built_from(flavour):
    text = (ROOT / "docker" / f"Dockerfile.{flavour}").read_text()
    final = text.split("\nFROM ")[-1]  # the runtime stage, not the wheel build
    assert 'ARG GIT_COMMIT=""' in final
    assert 'ENV PLE_ADATT_GIT_COMMIT="${GIT_COMMIT}"' in final
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in final
    # after the package install: a new commit rebuilds no dependency layer
    assert final.index("ARG GIT_COMMIT") > final.index("pip install")


def test_make_images_passes_the_checkout_commit():
    def head() -> str:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "GIT_COMMIT")}
    before = head()  # other work may commit in this checkout meanwhile
    plan = subprocess.run(["make", "--no-print-directory", "-n", "images"], cwd=ROOT, capture_output=True,
                          text=True, env=env, check=True).stdout
    heads = {before, head()}
    builds = [ln for ln in plan.splitlines() if "docker build -f" in ln]
    assert len(builds) == 2
    for line in builds:
        m = re.search(r"--build-arg GIT_COMMIT=(\S+)", line)
        assert m and m.group(1).removesuffix("-dirty") in heads, line
