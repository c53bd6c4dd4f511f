"""What a registered model holds and where it is found: one task set per registered model,
no registration without MLflow, and loading from another directory than the store's.

Against real stores: the session's ``mlflow server`` and sqlite stores in temp directories.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlhelpers import BIN, ROOT, Trained

import ple_adatt
from ple_adatt.data.adult import MARITAL_STATUS, OCCUPATION
from ple_adatt.registry import RegistryError, load_registered_model
from ple_adatt.stages.register import register_model

ADULT_QUICK = ["--set", "training.shared_expert_epochs=2", "--set", "transfer.adatt.warmup_epochs=1",
               "--set", "transfer.adatt.freeze_epoch=2", "--set", "training.cluster_finetune_epochs=1"]


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ple-adatt"), *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})})


def _adult_like(path: Path, rows: int = 2500) -> Path:
    """A file in the UCI Adult format with random values (the real file may be absent)."""
    rng = random.Random(0)
    lines = []
    for _ in range(rows):
        edu = rng.randint(1, 16)
        lines.append(", ".join(str(v) for v in (
            rng.randint(17, 80), rng.choice(["Private", "State-gov", "Self-emp-not-inc", "?"]),
            rng.randint(20_000, 400_000), "Bachelors", edu, rng.choice(MARITAL_STATUS), rng.choice(OCCUPATION),
            "Not-in-family", rng.choice(["White", "Black", "Other"]), rng.choice(["Male", "Female"]),
            rng.choice([0, 0, 0, 2174]), 0, rng.randint(1, 99), rng.choice(["United-States", "Mexico", "?"]),
            ">50K" if rng.random() < 0.3 + 0.02 * edu else "<=50K")))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def adult_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real 5-task model (configs/data/adult.yaml, configs/train/adult_small.yaml): its Phase 2
    checkpoint and validation result."""
    d = tmp_path_factory.mktemp("adult")
    src = _adult_like(d / "adult.data")
    for args in (["convert-adult", "--src", str(src), "--out", "adult.parquet"],
                 ["validate", "--no-tracking", "--data", "adult.parquet", "--config",
                  str(ROOT / "configs/data/adult.yaml"), "--out", "validation"],
                 ["train", "--no-tracking", "--data", "adult.parquet", "--data-config",
                  str(ROOT / "configs/data/adult.yaml"), "--config", str(ROOT / "configs/train/adult_small.yaml"),
                  "--validation", "validation", "--out", "run", *ADULT_QUICK]):
        proc = _cli(*args, cwd=d)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return d / "run" / "phase2", d / "validation"


def test_a_model_of_other_tasks_is_refused_and_registers_nothing(trained: Trained, adult_run: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    model = "contract-test"
    overrides = [f"registry.model_name={model}", f"tracking.tracking_uri={trained.tracking_uri}"]
    first = register_model(checkpoint=trained.phase2, validation=trained.validation, out=tmp_path / "a",
                           overrides=overrides)
    assert first["version"] == "1" and first["registered"] is True
    client = MlflowClient(trained.tracking_uri)
    aliases = dict(client.get_registered_model(model).aliases)
    logged_before = len(client.search_logged_models(
        [client.get_experiment_by_name("ple-adatt").experiment_id], max_results=1000))

    checkpoint, validation = adult_run
    with pytest.raises(RegistryError) as e:
        register_model(checkpoint=checkpoint, validation=validation, out=tmp_path / "b", overrides=overrides)
    msg = str(e.value)
    assert msg.startswith(f"registered model '{model}': v1 (@candidate, @champion) predicts 16 tasks: ctr, cvr,")
    assert ("this checkpoint's data contract 'adult5' declares 5 tasks: income, marital_status, occupation, "
            "hours_per_week, education_level") in msg
    assert f"--set registry.model_name={model}-adult5" in msg and "nothing was registered" in msg
    # nothing half-registered: no version, no alias moved, no logged model, no output
    assert [v.version for v in client.search_model_versions(f"name = '{model}'")] == ["1"]
    assert dict(client.get_registered_model(model).aliases) == aliases
    assert len(client.search_logged_models(
        [client.get_experiment_by_name("ple-adatt").experiment_id], max_results=1000)) == logged_before
    assert not (tmp_path / "b").exists()

    # under its own name it registers
    own = register_model(checkpoint=checkpoint, validation=validation, out=tmp_path / "c",
                         overrides=[f"registry.model_name={model}-adult5", f"tracking.tracking_uri={trained.tracking_uri}"])
    assert (own["model_name"], own["version"], own["decision"]) == (f"{model}-adult5", "1", "promoted")
    assert own["lineage"]["data_tasks"] == "income,marital_status,occupation,hours_per_week,education_level"


def test_no_tracking_registers_nothing_and_says_so(trained: Trained, tmp_path: Path) -> None:
    """PLE_ADATT_NO_TRACKING=1 skips MLflow for every stage, register too: no store is written."""
    store = tmp_path / "store" / "mlflow.db"
    proc = _cli("register", "--checkpoint", str(trained.phase2), "--validation", str(trained.validation),
                "--out", "out", cwd=tmp_path,
                env={"PLE_ADATT_NO_TRACKING": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("nothing registered: tracking is off (--no-tracking or "
                                          "PLE_ADATT_NO_TRACKING=1) and registering needs MLflow")
    rec = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert rec["registered"] is False and rec["version"] is None and rec["decision"] == "skipped"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["kind"] == "registration"
    assert not store.parent.exists() and not (tmp_path / "mlflow.db").exists()


def test_the_printed_load_call_works_from_another_directory(trained: Trained, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    repo.mkdir()
    elsewhere.mkdir()
    proc = _cli("register", "--checkpoint", str(trained.phase2), "--validation", str(trained.validation),
                "--out", "out", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    call = re.search(r"load it with: (ple_adatt\.registry\.load_registered_model\(.*\))  ->", proc.stdout).group(1)
    assert f"tracking_uri='sqlite:///{repo / 'mlflow.db'}'" in call

    monkeypatch.chdir(elsewhere)
    # without the store's URI: refused, naming the path, and no empty store made here
    with pytest.raises(RegistryError, match=re.escape(f"the MLflow store {elsewhere / 'mlflow.db'} does not exist")):
        load_registered_model("models:/ple-adatt@candidate")
    assert list(elsewhere.iterdir()) == []
    model = eval(call, {"ple_adatt": ple_adatt})  # the line register printed, as a user pastes it
    assert (model.name, model.version) == ("ple-adatt", "1")
    assert list(elsewhere.iterdir()) == []
