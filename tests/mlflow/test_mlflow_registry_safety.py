"""What the registry refuses and what a failed registration leaves behind (nothing).

Diverged checkpoints (non-finite weights, NaN or missing metrics), NaN in the champion
gate, a candidate alias that is the champion alias, model names with quotes, aliases
MLflow refuses, and a failure after the version was created: all against the session's
real ``mlflow server``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from mlhelpers import BIN, Server, Trained, derive_checkpoint

from ple_adatt.artifacts import ArtifactError, path_sha256
from ple_adatt.config import RegistryConfig, TrackingConfig, TrainConfig
from ple_adatt.registry import (
    RegistryError,
    _create_version,
    _finish,
    champion_gate,
    check_inputs,
    check_registry_settings,
    register_checkpoint,
)
from ple_adatt.stages.register import register_model
from ple_adatt.tracking import stage_run

NAN = float("nan")


def _register(trained: Trained, out: Path, model: str, *, checkpoint: Path | None = None,
              extra: list[str] | None = None, **kw: object) -> dict:
    return register_model(
        checkpoint=checkpoint or trained.phase2, validation=trained.validation, out=out,
        overrides=[f"registry.model_name={model}", f"tracking.tracking_uri={trained.tracking_uri}", *(extra or [])],
        **kw)


def _cli_register(trained: Trained, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.tracking_uri}
    return subprocess.run([str(BIN / "ple-adatt"), "register", "--validation", str(trained.validation),
                           "--out", str(out), *args], capture_output=True, text=True, env=env, timeout=300)


def _model_names(client: MlflowClient) -> set[str]:
    return {m.name for m in client.search_registered_models()}


def _logged_models(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("ple-adatt")
    return list(client.search_logged_models([exp.experiment_id], max_results=1000))


def _assert_no_orphan_bundles(server: Server, client: MlflowClient) -> None:
    """Every logged model's files on the server belong to a READY logged model of a finished run."""
    ready = {lm.model_id: lm for lm in _logged_models(client)}
    for lm in ready.values():
        assert str(lm.status).endswith("READY"), (lm.model_id, lm.status)
        assert client.get_run(lm.source_run_id).info.status == "FINISHED", lm.model_id
    for d in (server.root / "artifacts").glob("*/models/m-*"):
        if d.name not in ready:
            assert not [f for f in d.rglob("*") if f.is_file()], f"files of a deleted logged model left in {d}"


# ------------------------------------------------------------------ diverged checkpoints


def _rehash(ck: Path) -> None:
    man = json.loads((ck / "manifest.json").read_text())
    man["files"]["checkpoint.pt"] = path_sha256(ck / "checkpoint.pt")
    (ck / "manifest.json").write_text(json.dumps(man))


def _diverged(src: Path, dst: Path, case: str) -> Path:
    shutil.copytree(src, dst)
    if case in ("nan_weights", "inf_buffer"):
        state = torch.load(dst / "checkpoint.pt", weights_only=True)
        if case == "nan_weights":  # what a diverged run writes: most weights NaN
            for k, v in state.items():
                if v.is_floating_point() and "affinity" not in k:
                    state[k] = torch.full_like(v, NAN)
        else:
            key = "transfer.affinity_computer.affinity_matrix"
            state[key] = state[key].clone()
            state[key].view(-1)[0] = math.inf
        torch.save(state, dst / "checkpoint.pt")
        _rehash(dst)
    else:
        man = json.loads((dst / "manifest.json").read_text())
        if case == "nan_metrics":
            man["metrics"]["tasks"]["ltv"]["rmse"] = NAN
            man["metrics"]["val_loss"] = NAN
        elif case == "missing_metric":
            del man["metrics"]["tasks"]["ctr"]["auc"]
        elif case == "no_metrics":
            man["metrics"] = {}
        (dst / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.mark.parametrize(("case", "match"), [
    ("nan_weights", r"checkpoint.pt: \d+ of \d+ tensors hold NaN or infinite values .*; the training diverged"),
    ("inf_buffer", r"checkpoint.pt: 1 of \d+ tensors hold NaN or infinite values "
                   r"\(transfer.affinity_computer.affinity_matrix\); the training diverged"),
    ("nan_metrics", r"manifest.json: validation metric `metrics.val_loss` is nan \(and 1 more\)"),
    ("missing_metric", r"manifest.json: validation metric `metrics.tasks.ctr.auc` is missing"),
    ("no_metrics", r"manifest.json: key `metrics.tasks` is missing or empty"),
])
def test_a_diverged_checkpoint_is_refused_before_anything_is_logged(trained: Trained, mlflow_server: Server,
                                                                    tmp_path: Path, case: str, match: str) -> None:
    client = MlflowClient(trained.tracking_uri)
    logged_before = len(_logged_models(client))
    ck = _diverged(trained.phase2, tmp_path / "ck", case)
    with pytest.raises(ArtifactError, match=match):
        _register(trained, tmp_path / "out", "rec-diverged", checkpoint=ck)
    assert not (tmp_path / "out").exists()
    assert "rec-diverged" not in _model_names(client)
    assert len(_logged_models(client)) == logged_before


def test_the_cli_refuses_a_diverged_checkpoint_in_one_line(trained: Trained, mlflow_server: Server,
                                                          tmp_path: Path) -> None:
    ck = _diverged(trained.phase2, tmp_path / "ck", "nan_weights")
    proc = _cli_register(trained, tmp_path / "out", "--checkpoint", str(ck), "--set", "registry.model_name=lrinf")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"ple-adatt register: error: {ck / 'checkpoint.pt'}: ")
    assert "NaN or infinite values" in line and "training.learning_rate" in line
    assert "registered" not in proc.stdout
    assert "lrinf" not in _model_names(MlflowClient(trained.tracking_uri))


def test_a_one_class_task_with_an_undefined_auc_is_not_a_divergence(trained: Trained, tmp_path: Path) -> None:
    ck = Path(shutil.copytree(trained.phase2, tmp_path / "ck"))
    man = json.loads((ck / "manifest.json").read_text())
    man["metrics"]["tasks"]["cvr"].update(auc=NAN, positive_rate=1.0)  # every validation row positive
    (ck / "manifest.json").write_text(json.dumps(man))
    assert check_inputs(ck, trained.validation, None).manifest["metrics"]["tasks"]["cvr"]["positive_rate"] == 1.0
    man["metrics"]["tasks"]["cvr"]["positive_rate"] = 0.5  # both classes: a NaN AUC is a broken model
    (ck / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match=r"`metrics.tasks.cvr.auc` is nan"):
        check_inputs(ck, trained.validation, None)


# --------------------------------------------------------------------- the gate and NaN


def _m(value: float, higher: bool = True, metric: str = "auc") -> dict:
    return {"metric": metric, "value": value, "higher_is_better": higher}


def test_the_gate_never_promotes_on_nan() -> None:
    champ = {"ctr": _m(0.80), "ltv": _m(2.0, higher=False, metric="rmse")}
    good = {"ctr": _m(0.81), "ltv": _m(1.9, False, "rmse")}
    assert champion_gate(good, champ, 0.01, "4").promote  # the baseline: this one passes
    for tol in (NAN, math.inf, -0.01):
        for ch in (champ, None):
            d = champion_gate(good, ch, tol, "4")
            assert not d.promote and "not a finite number >= 0" in d.reason, (tol, ch)
    nan_cand = champion_gate({"ctr": _m(NAN), "ltv": _m(NAN, False, "rmse")}, champ, 0.01, "4")
    assert not nan_cand.promote and "ctr: auc is missing in the candidate" in nan_cand.reason
    inf_cand = champion_gate({"ctr": _m(0.9), "ltv": _m(math.inf, False, "rmse")}, champ, 0.01, "4")
    assert not inf_cand.promote and "ltv: rmse is missing in the candidate" in inf_cand.reason
    # a champion whose metrics are NaN: nothing can be compared, so nothing is promoted
    both_nan = champion_gate({"ctr": _m(NAN)}, {"ctr": _m(NAN)}, 0.01, "4")
    assert not both_nan.promote and "no task could be compared with champion v4" in both_nan.reason
    assert not champion_gate({"ctr": _m(0.9)}, {"ctr": _m(NAN)}, 0.01, "4").promote
    # without a champion, a candidate with no finite metric is not promoted either
    assert not champion_gate({"ctr": _m(NAN)}, None, 0.01).promote
    assert champion_gate({"ctr": _m(NAN), "cvr": _m(0.7)}, None, 0.01).promote


# ---------------------------------------------------------------- settings MLflow refuses


@pytest.mark.parametrize(("settings", "extra", "match"), [
    ({"tolerance": NAN}, [], r"registry.tolerance is nan; it must be a finite number >= 0"),
    ({"tolerance": -0.5}, [], r"registry.tolerance is -0.5"),
    ({"candidate_alias": "champion"}, [], r"registry.candidate_alias and registry.champion_alias are both "
                                          r"'champion'"),
    ({}, ["champion"], r"--alias champion: the champion alias moves only through the champion gate"),
    ({}, ["latest"], r"--alias 'latest': MLflow refuses this alias \('latest' alias name .*is reserved\)"),
    ({}, ["v3"], r"--alias 'v3': MLflow refuses this alias"),
    ({"candidate_alias": "Latest"}, [], r"registry.candidate_alias 'Latest': MLflow refuses this alias"),
    ({"champion_alias": "bad alias!"}, [], r"registry.champion_alias 'bad alias!': MLflow refuses this alias"),
    ({"model_name": "team/model"}, [], r"registry.model_name 'team/model': MLflow refuses it"),
])
def test_registry_settings_mlflow_would_refuse_are_refused_up_front(settings: dict, extra: list[str],
                                                                   match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        check_registry_settings(RegistryConfig(**settings), extra)
    check_registry_settings(RegistryConfig(), ["staging"])  # the defaults pass


def test_a_refused_alias_leaves_no_logged_model(trained: Trained, mlflow_server: Server, tmp_path: Path) -> None:
    client = MlflowClient(trained.tracking_uri)
    logged_before = len(_logged_models(client))
    proc = _cli_register(trained, tmp_path / "out", "--checkpoint", str(trained.phase2),
                         "--set", "registry.model_name=aliasm", "--alias", "latest")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ple-adatt register: error: --alias 'latest': MLflow refuses this alias ('latest' alias name (case "
        "insensitive) is reserved); use another alias name"]
    assert "aliasm" not in _model_names(client)
    assert len(_logged_models(client)) == logged_before
    assert not (tmp_path / "out").exists()
    _assert_no_orphan_bundles(mlflow_server, client)


# ------------------------------------------------------- the champion is the one before


def _tracker_args() -> argparse.Namespace:
    return argparse.Namespace(pipeline_run_id=None, no_tracking=False)


def _train_cfg(trained: Trained) -> TrainConfig:
    return TrainConfig(tracking=TrackingConfig(tracking_uri=trained.tracking_uri))


def test_the_gate_compares_with_the_champion_before_this_version(trained: Trained, tmp_path: Path) -> None:
    """Even with candidate_alias == champion_alias (refused up front), setting the aliases
    cannot make the new version its own champion: the gate still rejects a worse model."""
    model = "rec-selfchamp"
    client = MlflowClient(trained.tracking_uri)
    assert _register(trained, tmp_path / "v1", model)["decision"] == "promoted"
    worse = derive_checkpoint(trained.phase2, tmp_path / "worse", metric_shift=-0.2, seed=11)
    inputs = check_inputs(worse, trained.validation, None)
    bad = RegistryConfig(model_name=model, candidate_alias="champion")
    with stage_run("register", _tracker_args(), train_config=_train_cfg(trained)) as tracker:
        with pytest.raises(RegistryError, match="both 'champion'"):
            register_checkpoint(inputs, registry=bad, tracker=tracker)
        assert [v.version for v in client.search_model_versions(f"name='{model}'")] == ["1"]
        # below the refusal: the version created, then the aliases and the gate
        mv = _create_version(inputs, bad, tracker, None)
        rec = _finish(client, tracker.target, model, mv, inputs, bad, ())
    assert rec["version"] == "2" and rec["decision"] == "rejected", rec["reason"]
    assert "worse than champion v1" in rec["reason"] and rec["champion_before"] == "1"
    assert client.get_model_version_by_alias(model, "champion").version == "1"


# ----------------------------------------------------------------- names with quotes


@pytest.mark.parametrize("model", ["it's", 'say "hi"', "both ' and \""])
def test_model_names_with_quotes_register_again_and_gate(trained: Trained, tmp_path: Path, model: str) -> None:
    first = _register(trained, tmp_path / "a", model)
    again = _register(trained, tmp_path / "b", model)
    assert (first["version"], first["created"]) == ("1", True)
    assert (again["version"], again["created"]) == ("1", False)
    worse = derive_checkpoint(trained.phase2, tmp_path / "worse", metric_shift=-0.2, seed=12)
    rec = _register(trained, tmp_path / "c", model, checkpoint=worse)
    assert rec["version"] == "2" and rec["decision"] == "rejected" and "champion v1" in rec["reason"]
    client = MlflowClient(trained.tracking_uri)
    assert client.get_model_version_by_alias(model, "champion").version == "1"
    assert client.get_model_version_by_alias(model, "candidate").version == "2"


# ---------------------------------------------------- a failure after the version exists


def test_a_failure_after_registering_undoes_it(trained: Trained, mlflow_server: Server, tmp_path: Path) -> None:
    """A version that passed the gate, then the stage failed: the version, its logged model
    and its files are gone, the aliases are back where they were, the run is FAILED."""
    model = "rec-undo"
    client = MlflowClient(trained.tracking_uri)
    assert _register(trained, tmp_path / "v1", model, aliases=["staging"])["version"] == "1"
    better = derive_checkpoint(trained.phase2, tmp_path / "better", metric_shift=0.05, seed=13)
    inputs = check_inputs(better, trained.validation, None)
    logged_before = {lm.model_id for lm in _logged_models(client)}
    seen: dict = {}

    def fail(record: dict) -> None:
        seen.update(record)
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"), \
            stage_run("register", _tracker_args(), train_config=_train_cfg(trained)) as tracker:
        register_checkpoint(inputs, registry=RegistryConfig(model_name=model), tracker=tracker,
                            extra_aliases=["staging", "canary"], on_registered=fail)
    # it had been registered and promoted ...
    assert seen["version"] == "2" and seen["decision"] == "promoted"
    assert seen["aliases"] == ["canary", "candidate", "champion", "staging"]
    # ... and nothing of it is left
    assert [v.version for v in client.search_model_versions(f"name='{model}'")] == ["1"]
    aliases = {k: str(v) for k, v in client.get_registered_model(model).aliases.items()}
    assert aliases == {"candidate": "1", "champion": "1", "staging": "1"}
    assert {lm.model_id for lm in _logged_models(client)} == logged_before
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    _assert_no_orphan_bundles(mlflow_server, client)


def test_a_failed_first_registration_leaves_no_registered_model(trained: Trained, mlflow_server: Server,
                                                                tmp_path: Path) -> None:
    client = MlflowClient(trained.tracking_uri)
    inputs = check_inputs(trained.phase2, trained.validation, None)

    def fail(record: dict) -> None:
        raise RuntimeError("the output could not be written")

    with pytest.raises(RuntimeError), \
            stage_run("register", _tracker_args(), train_config=_train_cfg(trained)) as tracker:
        register_checkpoint(inputs, registry=RegistryConfig(model_name="rec-first-fails"), tracker=tracker,
                            on_registered=fail)
    assert "rec-first-fails" not in _model_names(client)
    _assert_no_orphan_bundles(mlflow_server, client)


def test_an_out_path_under_a_file_is_refused_before_registering(trained: Trained, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    proc = _cli_register(trained, tmp_path / "afile" / "out", "--checkpoint", str(trained.phase2),
                         "--set", "registry.model_name=rec-badout")
    assert proc.returncode == 2, proc.stderr
    assert f"--out {tmp_path / 'afile' / 'out'}: cannot create it: {tmp_path / 'afile'} is a file" in proc.stderr
    assert "rec-badout" not in _model_names(MlflowClient(trained.tracking_uri))
