"""A damaged checkpoint is refused in one line naming the file and key, before any training.

One tiny real Phase 1 checkpoint is shared by the module; each test copies it, damages one
file the way a hand edit, a truncated copy or a swapped file would, and loads it (directly
and through ``ple-adatt train-phase2``, which must exit 2 and write nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ple_adatt.artifacts import ArtifactError, path_sha256
from ple_adatt.checkpoint import PREPROCESSING_FILE, STATE_FILE, load_checkpoint
from ple_adatt.cli import main
from ple_adatt.data.synthetic import write_parquet
from ple_adatt.stages.train_common import run_phase1

ROOT = Path(__file__).resolve().parents[2]
DATA_CFG = ROOT / "configs/data/synthetic.yaml"
TINY = ROOT / "configs/train/compare_tiny.yaml"


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt-errors")
    data = write_parquet(d / "syn.parquet", rows=1200, seed=2)
    run_phase1(data=data, data_config=DATA_CFG, config=TINY, out=d / "p1", only_tasks=["ctr", "cvr"],
               overrides=["training.shared_expert_epochs=1"], log=lambda _: None)
    return d / "p1", data


def _copy(phase1, tmp_path: Path, *, old_format: bool = False) -> Path:
    """A copy of the checkpoint; ``old_format``: as written before preprocessing.json was hashed."""
    dst = tmp_path / "p1"
    shutil.copytree(phase1[0], dst)
    if old_format:
        _edit_json(dst / "manifest.json", lambda m: m["files"].pop(PREPROCESSING_FILE))
    return dst


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _grow_region_vocab(p: dict) -> None:
    p["vocabularies"]["region"] = [f"r{i}" for i in range(50)] + p["vocabularies"]["region"]


def _phase2_cli(ckpt: Path, data: Path, out: Path, capsys) -> str:
    rc = main(["train-phase2", "--no-tracking", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists(), "a refused checkpoint must leave no output"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_manifest_hashes_preprocessing_and_an_intact_checkpoint_loads(phase1, tmp_path):
    man = json.loads((phase1[0] / "manifest.json").read_text())
    assert man["files"][PREPROCESSING_FILE] == path_sha256(phase1[0] / PREPROCESSING_FILE)
    assert man["files"][STATE_FILE] == path_sha256(phase1[0] / STATE_FILE)
    assert load_checkpoint(phase1[0]).manifest["tasks"] == ["ctr", "cvr"]
    # a checkpoint written before the hash was recorded still loads (its files are checked for fit instead)
    assert load_checkpoint(_copy(phase1, tmp_path, old_format=True)).preprocessor.vocabularies


def test_edited_preprocessing_fails_the_content_hash(phase1, tmp_path, capsys):
    ck = _copy(phase1, tmp_path)
    _edit_json(ck / PREPROCESSING_FILE, _grow_region_vocab)
    with pytest.raises(ArtifactError, match=r"preprocessing\.json: content hash does not match its manifest"):
        load_checkpoint(ck)
    line = _phase2_cli(ck, phase1[1], tmp_path / "p2", capsys)
    assert f"{ck / PREPROCESSING_FILE}: content hash does not match" in line


def test_truncated_preprocessing_is_named_not_a_traceback(phase1, tmp_path, capsys):
    ck = _copy(phase1, tmp_path)
    (ck / PREPROCESSING_FILE).write_text("{\n")
    with pytest.raises(ArtifactError, match="content hash does not match"):
        load_checkpoint(ck)
    ck_old = _copy(phase1, tmp_path / "old", old_format=True)
    (ck_old / PREPROCESSING_FILE).write_text("{\n")
    line = _phase2_cli(ck_old, phase1[1], tmp_path / "p2", capsys)
    assert f"{ck_old / PREPROCESSING_FILE}: not valid JSON" in line


def test_old_checkpoint_with_a_vocabulary_that_does_not_fit_is_refused(phase1, tmp_path, capsys):
    ck = _copy(phase1, tmp_path, old_format=True)
    _edit_json(ck / PREPROCESSING_FILE, _grow_region_vocab)
    line = _phase2_cli(ck, phase1[1], tmp_path / "p2", capsys)
    assert f"{ck / PREPROCESSING_FILE}: key `vocabularies` does not fit the model" in line and "region:" in line


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.pop("vocabularies"), "key `vocabularies` is missing"),
    (lambda p: p["numeric"].update(num_00={"mean": "x"}), "key `numeric.num_00` must be"),
    (lambda p: p["vocabularies"].pop("region"), r"key `vocabularies` lacks the categorical features \['region'\]"),
    (lambda p: p["vocabularies"]["region"].__setitem__(1, p["vocabularies"]["region"][0]),
     r"key `vocabularies.region` lists '.*' twice"),
])
def test_old_checkpoint_with_malformed_preprocessing_names_the_key(phase1, tmp_path, change, message):
    ck = _copy(phase1, tmp_path, old_format=True)
    _edit_json(ck / PREPROCESSING_FILE, change)
    with pytest.raises(ArtifactError, match=f"{PREPROCESSING_FILE}: {message}"):
        load_checkpoint(ck)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.pop("tasks"), "key `tasks` is missing"),
    (lambda m: m.update(tasks="ctr"), "key `tasks` must be a non-empty list of task names"),
    (lambda m: m.update(tasks=["ctr", "nope"]), r"key `tasks` names \['nope'\]"),
    (lambda m: m["model"].pop("cardinalities"), "key `model.cardinalities` is missing"),
    (lambda m: m["model"].update(num_clusters=0), "key `model.num_clusters` must be an integer >= 1"),
    (lambda m: m.pop("train_config"), "key `train_config` is missing"),
    (lambda m: m["files"].pop(STATE_FILE), r"key `files.checkpoint.pt` \(the sha256 of the state_dict\) is missing"),
])
def test_incomplete_manifest_names_the_key(phase1, tmp_path, capsys, change, message):
    ck = _copy(phase1, tmp_path)
    _edit_json(ck / "manifest.json", change)
    with pytest.raises(ArtifactError, match=f"manifest.json: {message}"):
        load_checkpoint(ck)
    if "tasks" in message:
        assert f"{ck / 'manifest.json'}: {message.replace(chr(92), '')}" in _phase2_cli(ck, phase1[1], tmp_path / "p2", capsys)


def test_a_manifest_whose_tasks_were_edited_names_the_tensor_that_does_not_fit(phase1, tmp_path):
    ck = _copy(phase1, tmp_path)
    _edit_json(ck / "manifest.json", lambda m: m.__setitem__("tasks", m["tasks"][:1]))
    with pytest.raises(ArtifactError, match=r"checkpoint.pt: state_dict does not fit the model its manifest describes "
                                            r"\((size mismatch for|Unexpected key|Missing key)\S* .*\); the manifest's"):
        load_checkpoint(ck)
