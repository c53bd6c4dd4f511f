"""Registration: load-by-alias equality, lineage tags, the champion gate, idempotency, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlhelpers import BIN, PIPELINE_RUN_ID, TRAIN_CONFIG, Trained, derive_checkpoint, free_port
from mlhelpers import ple_adatt as run_cli

import ple_adatt
from ple_adatt.artifacts import ArtifactError
from ple_adatt.checkpoint import load_checkpoint, required_state_keys
from ple_adatt.data.dataset import SPLIT_COLUMN, load_split, scan_dataset, split_expr
from ple_adatt.registry import champion_gate, load_registered_model
from ple_adatt.stages.register import register_model

MODEL = "rec-test"


def _register(trained: Trained, out: Path, *, checkpoint: Path | None = None, model: str = MODEL,
              validation: Path | None = None, extra: list[str] | None = None, **kw: object) -> dict:
    return register_model(
        checkpoint=checkpoint or trained.phase2, validation=validation or trained.validation, out=out,
        overrides=[f"registry.model_name={model}", f"tracking.tracking_uri={trained.tracking_uri}",
                   *(extra or [])], **kw)


def _test_rows(trained: Trained) -> tuple:
    ck = load_checkpoint(trained.phase2)
    ck.system.model.eval()
    rows = load_split(trained.data, ck.data_cfg, ck.preprocessor, "test", ck.manifest["tasks"])
    with torch.no_grad():
        expected = ck.system.model.predict(rows.x_num, rows.x_cat, rows.cluster)
    return ck, rows, expected


@pytest.fixture(scope="module")
def registered(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("register") / "out"
    return _register(trained, out, pipeline_run_id=PIPELINE_RUN_ID, aliases=["staging"]), out


def test_first_version_is_candidate_and_champion(trained: Trained, registered: tuple[dict, Path]) -> None:
    rec, out = registered
    client = MlflowClient(trained.tracking_uri)
    about = client.get_registered_model(MODEL).description
    assert about.startswith("PLE-Cluster multi-task model") and "adaTT" in about and "@champion" in about
    assert "ctr, cvr" in about and "1.0% (relative)" in about
    desc = client.get_model_version(MODEL, "1").description
    assert desc.startswith("v1: 16 tasks trained with transfer strategy adatt. Champion gate: promoted "
                           "(no champion yet).")
    assert f"Registered by pipeline run {PIPELINE_RUN_ID}" in desc and "train-phase2 run " in desc
    assert rec["version"] == "1" and rec["created"] is True
    assert rec["aliases"] == ["candidate", "champion", "staging"]
    assert rec["decision"] == "promoted" and rec["reason"] == "no champion yet"
    on_disk = json.loads((out / "registration.json").read_text())
    assert on_disk["version"] == "1" and on_disk["decision"] == "promoted"
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "registration" and man["inputs"]["checkpoint"] == rec["lineage"]["checkpoint_sha256"]


def test_load_by_alias_predicts_like_the_trained_model(trained: Trained, registered: tuple[dict, Path],
                                                       tmp_path: Path) -> None:
    import mlflow

    ck, rows, expected = _test_rows(trained)
    model = load_registered_model(f"models:/{MODEL}@champion", tracking_uri=trained.tracking_uri,
                                  dst_path=tmp_path / "dl")
    assert (model.name, model.version) == (MODEL, "1")
    got = model.predict(rows.x_num, rows.x_cat, rows.cluster)
    assert set(got) == set(expected)
    for task in expected:
        assert torch.equal(got[task], expected[task]), task
    # the version's files: the checkpoint with its adaTT buffers, the validation result
    state = torch.load(model.path / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert all(k in state for k in required_state_keys("adatt"))
    assert torch.equal(state["transfer.affinity_computer.affinity_matrix"],
                       ck.system.state_dict()["transfer.affinity_computer.affinity_matrix"])
    assert (model.path / "validation" / "availability.json").is_file()
    # the generic MLflow way: pyfunc on raw rows, same numbers
    lf = scan_dataset(trained.data)
    raw = (lf.with_columns(split_expr(ck.data_cfg.split, dict(lf.collect_schema())))
           .filter(pl.col(SPLIT_COLUMN) == "test").drop(SPLIT_COLUMN).collect().to_pandas())
    from ple_adatt.registry import _fluent_uri

    with _fluent_uri(trained.tracking_uri):
        frame = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(raw)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # put back as it was
    assert len(frame) == len(rows)
    np.testing.assert_array_equal(frame["ctr"].to_numpy(), expected["ctr"].double().numpy())
    np.testing.assert_array_equal(np.stack(frame["nba"].to_numpy()), expected["nba"].double().numpy())


def test_lineage_tags(trained: Trained, registered: tuple[dict, Path]) -> None:
    client = MlflowClient(trained.tracking_uri)
    tags = client.get_model_version(MODEL, "1").tags
    man = json.loads((trained.phase2 / "manifest.json").read_text())
    assert tags["data_sha256"] == man["inputs"]["data"]
    assert tags["checkpoint_sha256"] == man["files"]["checkpoint.pt"]
    assert tags["config_hash"] == man["config_hash"]
    assert tags["data_config_hash"] == man["data_config_hash"]
    assert tags["package_version"] == ple_adatt.__version__
    assert tags["data_tasks"] == ",".join(t["name"] for t in man["data_config"]["tasks"])  # the task set
    assert tags["git_commit"] == man["producer"]["git_commit"]
    assert tags["pipeline_run_id"] == PIPELINE_RUN_ID
    # every stage that made the version, by the pipeline's stage names (`ple-adatt train` writes
    # "train" as both checkpoints' producer); Phase 1's from its run, found by its checkpoint hash
    assert json.loads(tags["component_versions"]) == {"train-phase1": ple_adatt.__version__,
                                                      "train-phase2": man["producer"]["component_version"],
                                                      "validate": ple_adatt.__version__,
                                                      "register": ple_adatt.__version__}
    pairs = sorted({tuple(sorted((a, b))) for a, bs in man["negative_transfer"].items() for b in bs})
    assert tags["negative_transfer_pairs"] == (",".join(f"{a}<->{b}" for a, b in pairs) or "none")
    assert tags["champion_decision"] == "promoted"
    assert tags["champion_decision_reason"] == "no champion yet"
    # one meaning per tag name: the data config hash of the version is the one every run carries
    from ple_adatt.artifacts import path_sha256

    exp_id = client.get_experiment_by_name("ple-adatt").experiment_id
    avail = path_sha256(trained.validation / "availability.json")
    assert tags["validation_sha256"] == avail
    # the version leads to the runs that made its inputs
    by_stage = {s: client.get_run(tags[f"{s.replace('-', '_')}_run_id"]) for s in
                ("validate", "train-phase1", "train-phase2")}
    assert by_stage["train-phase2"].data.tags["checkpoint.sha256"] == man["files"]["checkpoint.pt"]
    assert by_stage["train-phase1"].data.tags["checkpoint.sha256"] == man["inputs"]["checkpoint"]
    assert by_stage["validate"].data.tags["validation.sha256"] == avail
    assert {r.data.tags["stage"] for r in by_stage.values()} == {"validate", "train-phase1", "train-phase2"}
    assert tags["train_pipeline_run_id"] == PIPELINE_RUN_ID
    for run in by_stage.values():
        assert run.info.experiment_id == exp_id
        assert run.data.tags["input.data_config"] == tags["data_config_hash"], run.data.tags["stage"]
    assert by_stage["validate"].data.tags["input.data_config_file"] != tags["data_config_hash"]  # the YAML bytes
    reg_run = client.get_run(client.get_model_version(MODEL, "1").run_id)
    assert reg_run.data.tags["input.data_config"] == tags["data_config_hash"]
    # the register stage is a nested run of the same pipeline run as the training
    runs = client.search_runs([client.get_experiment_by_name("ple-adatt").experiment_id],
                              f"tags.pipeline_run_id = '{PIPELINE_RUN_ID}'")
    stages = {r.data.tags.get("stage") for r in runs if r.data.tags.get("ple_adatt_role") == "stage"}
    assert {"train-phase1", "train-phase2", "register"} <= stages
    assert len([r for r in runs if r.data.tags.get("ple_adatt_role") == "pipeline"]) == 1


def test_a_load_without_dst_path_cleans_its_download_up_with_the_model(trained: Trained,
                                                                     registered: tuple[dict, Path]) -> None:
    import gc

    model = load_registered_model(f"models:/{MODEL}@champion", tracking_uri=trained.tracking_uri)
    root = Path(tempfile.gettempdir())
    download = next(p for p in [model.path, *model.path.parents] if p.parent == root)
    assert download.name.startswith("ple-adatt-model-") and (model.path / "checkpoint" / "checkpoint.pt").is_file()
    del model
    gc.collect()
    assert not download.exists()


def test_registering_the_same_checkpoint_again_returns_the_version(trained: Trained, registered: tuple[dict, Path],
                                                                 tmp_path: Path) -> None:
    again = _register(trained, tmp_path / "out", pipeline_run_id=PIPELINE_RUN_ID)
    assert again["version"] == "1" and again["created"] is False
    assert again["decision"] == "promoted"
    assert [v.version for v in MlflowClient(trained.tracking_uri).search_model_versions(f"name='{MODEL}'")] == ["1"]


def test_champion_gate_both_ways(trained: Trained, registered: tuple[dict, Path], tmp_path: Path) -> None:
    client = MlflowClient(trained.tracking_uri)
    worse = derive_checkpoint(trained.phase2, tmp_path / "worse", metric_shift=-0.2, seed=1)
    rec = _register(trained, tmp_path / "out-worse", checkpoint=worse)
    assert rec["version"] == "2" and rec["aliases"] == ["candidate"]
    assert rec["decision"] == "rejected" and "champion v1" in rec["reason"] and "ctr auc" in rec["reason"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    v2 = client.get_model_version(MODEL, "2")
    assert v2.tags["champion_decision"] == "rejected"
    # the version says in one paragraph why it is not the champion, and what it is
    assert f"Champion gate: rejected ({rec['reason']})" in v2.description and "\n" not in v2.description
    assert "ctr auc " in v2.description and f"validation {v2.tags['validation_sha256'][:12]}" in v2.description
    assert f"Negative-transfer pairs: {v2.tags['negative_transfer_pairs'].replace(',', ', ')}" in v2.description \
        or v2.tags["negative_transfer_pairs"] == "none" and "Negative-transfer pairs: none" in v2.description
    assert f"Data sha256 {v2.tags['data_sha256'][:12]}" in v2.description
    # a description someone edited stays as it is
    client.update_registered_model(MODEL, description="edited by hand")

    better = derive_checkpoint(trained.phase2, tmp_path / "better", metric_shift=0.05, seed=2)
    rec = _register(trained, tmp_path / "out-better", checkpoint=better)
    assert rec["version"] == "3" and rec["decision"] == "promoted"
    assert rec["reason"].startswith("no task worse than champion v1 by more than 1.0%")
    assert client.get_model_version_by_alias(MODEL, "champion").version == "3"
    assert client.get_model_version_by_alias(MODEL, "candidate").version == "3"
    assert rec["champion_before"] == "1"
    assert client.get_registered_model(MODEL).description == "edited by hand"
    assert "Champion gate: promoted (no task worse than champion v1" in client.get_model_version(MODEL, "3").description

    # registering v1's checkpoint again (with an extra alias) reuses v1: its decision stands,
    # and the candidate alias stays on v3, which is newer
    again = _register(trained, tmp_path / "out-again", aliases=["staging"])
    assert again["version"] == "1" and again["created"] is False
    assert again["reason"].startswith("decided when v1 was registered: ")
    assert client.get_model_version_by_alias(MODEL, "candidate").version == "3"
    assert client.get_model_version_by_alias(MODEL, "staging").version == "1"
    assert client.get_model_version_by_alias(MODEL, "champion").version == "3"


def _no_manifest(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    return dst


def _no_adatt_buffers(src: Path, dst: Path) -> Path:
    from ple_adatt.artifacts import path_sha256

    shutil.copytree(src, dst)
    state = torch.load(dst / "checkpoint.pt", weights_only=True)
    del state["transfer.affinity_computer.affinity_matrix"]
    torch.save(state, dst / "checkpoint.pt")
    man = json.loads((dst / "manifest.json").read_text())
    man["files"]["checkpoint.pt"] = path_sha256(dst / "checkpoint.pt")
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.mark.parametrize(("case", "match"), [
    ("no_manifest", "no manifest.json"),
    ("no_adatt_buffers", r"lacks required buffers \['transfer.affinity_computer.affinity_matrix'\]"),
    ("phase1", "is a phase1 checkpoint; register the Phase 2 checkpoint"),
    ("other_data", "validation result was computed for a different dataset"),
    ("other_data_config", "validation result was computed under data config .* which differs from the data config"),
    ("empty_report", "holds none of report.html"),
])
def test_refused_inputs_register_nothing(trained: Trained, mlflow_server: object, tmp_path: Path,
                                         case: str, match: str) -> None:
    ckpt, validation, report = trained.phase2, trained.validation, None
    if case == "no_manifest":
        ckpt = _no_manifest(trained.phase2, tmp_path / "ck")
    elif case == "no_adatt_buffers":
        ckpt = _no_adatt_buffers(trained.phase2, tmp_path / "ck")
    elif case == "phase1":
        ckpt = trained.phase1
    elif case in ("other_data", "other_data_config"):
        validation = Path(shutil.copytree(trained.validation, tmp_path / "val"))
        man = json.loads((validation / "manifest.json").read_text())
        if case == "other_data":
            man["inputs"]["data"] = "sha256:" + "0" * 64
        else:
            man["config_hash"] = "f" * 64
        (validation / "manifest.json").write_text(json.dumps(man))
    else:
        report = tmp_path / "report"
        report.mkdir()
    with pytest.raises(ArtifactError, match=match):
        _register(trained, tmp_path / "out", checkpoint=ckpt, validation=validation, report=report,
                  model="rec-refused")
    assert not (tmp_path / "out").exists()
    assert MlflowClient(trained.tracking_uri).search_registered_models("name = 'rec-refused'") == []


def test_report_files_are_attached(trained: Trained, tmp_path: Path) -> None:
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("<html><body>affinity</body></html>")
    (report / "report.json").write_text(json.dumps({"negative_transfer": []}))
    rec = _register(trained, tmp_path / "out", report=report, model="rec-report")
    model = load_registered_model("models:/rec-report@candidate", tracking_uri=trained.tracking_uri,
                                  dst_path=tmp_path / "dl")
    assert (model.path / "report" / "report.html").read_text().startswith("<html>")
    assert model.tags["has_report"] == "true" and rec["version"] == "1"
    client = MlflowClient(trained.tracking_uri)
    assert {a.path for a in client.list_artifacts(rec["run_id"], "report")} == {"report/report.html",
                                                                               "report/report.json"}


def _cli_register(trained: Trained, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ple-adatt"), "register", "--validation", str(trained.validation), "--out", str(out),
         "--set", f"tracking.tracking_uri={trained.tracking_uri}", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PLE_ADATT_NO_TRACKING": "0"})


def test_a_report_of_another_checkpoint_is_refused_and_the_matching_one_is_bundled(
        trained: Trained, mlflow_server: object, tmp_path: Path) -> None:
    """NEW-3: a register rerun after a train-phase2 rerun bundled the old checkpoint's report and
    tagged the version has_report=true; the report's manifest names the checkpoint it describes."""
    report = tmp_path / "report"
    run_cli("report", "--phase1", str(trained.phase1), "--phase2", str(trained.phase2), "--validation",
              str(trained.validation), "--out", str(report), env={"PLE_ADATT_NO_TRACKING": "1"})
    made_from = json.loads((report / "manifest.json").read_text())["inputs"]["phase2"].removeprefix("sha256:")
    other = derive_checkpoint(trained.phase2, tmp_path / "other", metric_shift=0.0, seed=5)
    other_sha = json.loads((other / "manifest.json").read_text())["files"]["checkpoint.pt"].removeprefix("sha256:")
    assert other_sha != made_from
    proc = _cli_register(trained, tmp_path / "out", "--checkpoint", str(other), "--report", str(report),
                         "--set", "registry.model_name=rec-stale-report")
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert err.startswith(f"ple-adatt register: error: --report {report}: describes the Phase 2 checkpoint "
                          f"{made_from[:12]}"), err
    assert f"not {other_sha[:12]} of {other}" in err
    assert "make stage STAGE=report RUN=<dir>" in err and err.endswith("or leave out --report")
    assert not (tmp_path / "out").exists()
    client = MlflowClient(trained.tracking_uri)
    assert client.search_registered_models("name = 'rec-stale-report'") == []
    # the report of the checkpoint being registered is bundled, and says which checkpoint it describes
    rec = _register(trained, tmp_path / "out", report=report, model="rec-stale-report")
    assert rec["version"] == "1" and rec["created"] is True
    model = load_registered_model("models:/rec-stale-report@candidate", tracking_uri=trained.tracking_uri,
                                  dst_path=tmp_path / "dl")
    assert model.tags["has_report"] == "true"
    bundled = json.loads((model.path / "report" / "manifest.json").read_text())
    assert bundled["inputs"]["phase2"].removeprefix("sha256:") == model.tags["checkpoint_sha256"].removeprefix("sha256:")


def test_register_refuses_overrides_it_would_ignore(trained: Trained, mlflow_server: object, tmp_path: Path) -> None:
    """D6: register reads registry.* and tracking.* only; SET='training.shared_expert_epochs=...' was
    accepted, ignored and recorded. Restating a trained value (what a pipeline passes) is accepted."""
    trained_epochs = json.loads((trained.phase2 / "manifest.json").read_text())[
        "train_config"]["training"]["shared_expert_epochs"]
    proc = _cli_register(trained, tmp_path / "out", "--checkpoint", str(trained.phase2),
                         "--set", "registry.model_name=rec-ignored-set",
                         "--set", f"training.shared_expert_epochs={trained_epochs + 7}")
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err, err
    assert err.startswith(f"ple-adatt register: error: --set 'training.shared_expert_epochs={trained_epochs + 7}': "
                          "register uses only the registry.* and tracking.* keys of the train config"), err
    assert f"trained with training.shared_expert_epochs={trained_epochs}" in err
    assert not (tmp_path / "out").exists()
    assert MlflowClient(trained.tracking_uri).search_registered_models("name = 'rec-ignored-set'") == []
    # the value the checkpoint was trained with, as a pipeline passes it to every step: accepted
    rec = _register(trained, tmp_path / "out", model="rec-ignored-set",
                    extra=[f"training.shared_expert_epochs={trained_epochs}", "registry.tolerance=0.05"])
    assert rec["created"] is True and rec["version"] == "1"


def test_an_out_that_holds_the_config_is_refused(trained: Trained, tmp_path: Path) -> None:
    """--config is an input too: OUT is replaced whole, so it must not hold the config file."""
    import re

    out = tmp_path / "out"
    out.mkdir()
    cfg = Path(shutil.copy(TRAIN_CONFIG, out / "train.yaml"))
    with pytest.raises(ArtifactError, match=re.escape(f"--out {out}: holds the input {cfg}")):
        register_model(checkpoint=trained.phase2, validation=trained.validation, out=out, config=cfg,
                       no_tracking=True)
    assert cfg.is_file()


def test_register_cli_with_the_server_down_fails_clearly(trained: Trained, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    proc = subprocess.run(
        [str(BIN / "ple-adatt"), "register", "--checkpoint", str(trained.phase2), "--validation",
         str(trained.validation), "--out", str(tmp_path / "out"), "--set", "tracking.retries=1",
         "--set", "tracking.retry_wait_s=0.1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "did not answer after 2 attempts" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_register_and_load_on_the_local_sqlite_store(trained: Trained, local_store: Path) -> None:
    rec = register_model(checkpoint=trained.phase2, validation=trained.validation, out=local_store / "out")
    assert rec["tracking_uri"] == f"sqlite:///{local_store / 'mlflow.db'}" and rec["model_name"] == "ple-adatt"
    assert (local_store / "mlflow.db").is_file() and (local_store / "mlartifacts").is_dir()
    _, rows, expected = _test_rows(trained)
    got = load_registered_model("models:/ple-adatt@candidate").predict(rows.x_num, rows.x_cat, rows.cluster)
    for task in expected:
        assert torch.equal(got[task], expected[task]), task


def _m(value: float, higher: bool = True, metric: str = "auc") -> dict:
    return {"metric": metric, "value": value, "higher_is_better": higher}


def test_champion_gate_rules() -> None:
    champ = {"ctr": _m(0.80), "ltv": _m(2.0, higher=False, metric="rmse")}
    assert champion_gate({"ctr": _m(0.80)}, None, 0.01).reason == "no champion yet"
    ok = champion_gate({"ctr": _m(0.795), "ltv": _m(2.01, False, "rmse")}, champ, 0.01, "4")
    assert ok.promote and "champion v4" in ok.reason
    bad = champion_gate({"ctr": _m(0.70), "ltv": _m(2.0, False, "rmse")}, champ, 0.01, "4")
    assert not bad.promote and "ctr auc 0.7 vs 0.8 (12.5% worse)" in bad.reason
    bad_rmse = champion_gate({"ctr": _m(0.81), "ltv": _m(2.1, False, "rmse")}, champ, 0.01)
    assert not bad_rmse.promote and "ltv rmse" in bad_rmse.reason
    missing = champion_gate({"ctr": _m(0.9)}, champ, 0.5)
    assert not missing.promote and "ltv: not in the candidate" in missing.reason
    assert champion_gate({"ctr": _m(0.70), "ltv": _m(2.0, False)}, champ, 0.2).promote
