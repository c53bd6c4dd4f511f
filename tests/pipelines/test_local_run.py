"""A real local pipeline run (kfp.local, the compiled IR, the real components) and stage reruns.

One tiny run (1,500 rows, one epoch per phase) is shared by the module; it goes through all
five steps, registers into a temporary MLflow store, and is then the source of the reruns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

from pipelines.compile import main as compile_main
from pipelines.local import LocalRunError, run_locally
from pipelines.pipeline import TASKS
from pipelines.runs import RunError, find_artifact, read_run_file, summarize_run
from pipelines.stage import main as stage_main
from pipelines.stage import rerun_stage

_MISSING = [m for m in ("ple_adatt.stages.report", "ple_adatt.stages.register") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(_MISSING), reason=f"stage modules not in this checkout yet: {', '.join(_MISSING)}"),
]
FAST = ["training.shared_expert_epochs=1", "training.cluster_finetune_epochs=1"]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from ple_adatt.data.synthetic import write_parquet

    base = tmp_path_factory.mktemp("local")
    data = write_parquet(base / "tiny.parquet", rows=1500, seed=1)
    package = base / "pipeline.yaml"
    assert compile_main(["--out", str(package)]) == 0  # the IR that would go to Kubeflow
    tracking = f"sqlite:///{base / 'mlflow.db'}"
    run_dir = run_locally(data=data, package=package, train_config="configs/train/cpu_small.yaml",
                          overrides=FAST, root=base / "runs", mlflow_tracking_uri=tracking, gx_rows="all")
    return run_dir, tracking, base


def test_local_pipeline_run_goes_through_all_five_steps(local_run):
    run_dir, tracking, _ = local_run
    info = read_run_file(run_dir)
    assert info["status"] == "succeeded" and info["kind"] == "pipeline-run"
    assert info["params"]["overrides"] == FAST
    avail = json.loads((find_artifact(run_dir, "validate", "validation") / "availability.json").read_text())
    p1 = json.loads((find_artifact(run_dir, "train-phase1", "checkpoint") / "manifest.json").read_text())
    p2 = json.loads((find_artifact(run_dir, "train-phase2", "checkpoint") / "manifest.json").read_text())
    assert (p1["phase"], p2["phase"]) == ("phase1", "phase2")
    assert p1["tasks"] == p2["tasks"] == avail["enabled_tasks"]  # only enabled tasks train
    assert p1["producer"]["component_version"] == info["version"]
    report = find_artifact(run_dir, "report", "report")
    assert {"report.html", "report.md", "report.json", "manifest.json"} <= {p.name for p in report.iterdir()}
    assert find_artifact(run_dir, "report", "report_html").read_bytes() == (report / "report.html").read_bytes()
    reg = json.loads((find_artifact(run_dir, "register", "registration") / "registration.json").read_text())
    assert reg["model_name"] and int(reg["version"]) >= 1
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    mv = client.get_model_version(reg["model_name"], str(reg["version"]))
    assert str(mv.version) == str(reg["version"])  # registered in the run's MLflow store
    assert "candidate" in mv.aliases
    text = summarize_run(run_dir)
    assert "phase2 validation metrics" in text and "negative-transfer pairs" in text
    assert f"version {reg['version']}" in text and "report.html" in text
    assert (run_dir / "pipeline.log").read_text().count("finished with status") >= len(TASKS)


def test_stage_rerun_writes_a_new_directory_and_leaves_the_source_untouched(local_run, tmp_path, capsys):
    run_dir, _, _ = local_run
    before = _tree_digest(run_dir)
    out = tmp_path / "rerun-p2"
    rc = stage_main(["train-phase2", "--run", str(run_dir), "--out", str(out),
                     "--set", "training.cluster_finetune_epochs=2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert _tree_digest(run_dir) == before, "a rerun must never modify its source run"
    assert str(out) in printed and "checkpoint" in printed
    info = read_run_file(out)
    assert info["kind"] == "stage-rerun" and info["source_run"] == str(run_dir.resolve())
    assert info["params"]["overrides"] == [*FAST, "training.cluster_finetune_epochs=2"]
    new = json.loads((out / "train-phase2" / "checkpoint" / "manifest.json").read_text())
    old = json.loads((find_artifact(run_dir, "train-phase2", "checkpoint") / "manifest.json").read_text())
    assert new["train_config"]["training"]["cluster_finetune_epochs"] == 2
    assert old["train_config"]["training"]["cluster_finetune_epochs"] == 1
    assert json.loads((out / "train-phase2" / "metrics").read_text())  # per-task metrics, as a file
    # the rerun directory is a run: the next stage reruns against it, taking phase1 from the source
    report_dir = rerun_stage("report", out, out=tmp_path / "rerun-report")
    rep = json.loads((report_dir / "report" / "report" / "manifest.json").read_text())
    assert rep["inputs"]["phase2"] == new["files"]["checkpoint.pt"]
    assert read_run_file(report_dir)["inputs"]["phase1_checkpoint"] == str(
        find_artifact(run_dir, "train-phase1", "checkpoint"))
    # the inputs taken from the source run are recorded as such; the rerun's own output is not
    assert read_run_file(report_dir)["input_runs"] == {"phase1_checkpoint": str(run_dir.resolve()),
                                                       "validation": str(run_dir.resolve())}
    assert "inputs:" in printed and "from its source run" not in printed  # phase2 rerun: all from run_dir itself
    assert _tree_digest(run_dir) == before
    # register against the phase2 rerun would bundle the source run's report, of the old checkpoint
    # (NEW-3): refused before the new directory or anything in MLflow exists, naming the fix
    stale = find_artifact(run_dir, "report", "report")
    refused = tmp_path / "rerun-register-stale"
    assert stage_main(["register", "--run", str(out), "--out", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"make stage: error: the report {stale} describes the Phase 2 checkpoint "
                          f"{old['files']['checkpoint.pt'].removeprefix('sha256:')[:12]}, not "
                          f"{new['files']['checkpoint.pt'].removeprefix('sha256:')[:12]}"), err
    assert f"make stage STAGE=report RUN={out.resolve()}" in err and "\n" not in err
    assert not refused.exists()
    # against the report rerun, report and checkpoint agree: registered, with that report
    reg_dir = rerun_stage("register", report_dir, out=tmp_path / "rerun-register")
    reg = json.loads((reg_dir / "register" / "registration" / "registration.json").read_text())
    assert reg["registered"] is True and reg["lineage"]["has_report"] == "true"
    assert reg["lineage"]["checkpoint_sha256"] == new["files"]["checkpoint.pt"]
    assert _tree_digest(run_dir) == before


def test_stage_rerun_refuses_bad_requests_in_one_line(local_run, tmp_path, capsys):
    run_dir, _, _ = local_run
    assert stage_main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert stage_main(["report", "--run", str(run_dir), "--out", str(run_dir / "inside")]) == 2
    assert "overlaps the source run" in capsys.readouterr().err
    with pytest.raises(RunError, match="unknown stage 'train'; valid: validate, train-phase1"):
        rerun_stage("train", run_dir)
    with pytest.raises(RunError, match="already exists"):
        rerun_stage("report", run_dir, out=tmp_path)


@pytest.mark.parametrize(("stage", "override", "expected"), [
    ("validate", "training.bogus=3", "stage validate takes no train-config overrides"),
    ("report", "training.shared_expert_epochs=3", "stage report takes no train-config overrides"),
    ("train-phase1", "training.bogus=3", "unknown key `training.bogus`"),
    ("train-phase2", "training.bogus=3", "unknown key `training.bogus`"),
    ("register", "registry.bogus=3", "unknown key `registry.bogus`"),
    ("register", "training.shared_expert_epochs=3",
     "--set 'training.shared_expert_epochs=3': register uses only the registry.* and tracking.* keys"),
])
def test_make_stage_checks_set_before_anything_runs(local_run, tmp_path, capsys, stage, override, expected):
    """SET= on a stage that takes no overrides was recorded in run.json and broke a later
    train-phase1 rerun from that directory; an unknown key got as far as the stage."""
    run_dir, _, _ = local_run
    before = _tree_digest(run_dir)
    out = tmp_path / "rerun"
    assert stage_main([stage, "--run", str(run_dir), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make stage: error: ") and expected in err and "\n" not in err, err
    assert not out.exists()  # refused before the new directory (and any MLflow run) was made
    assert _tree_digest(run_dir) == before


def test_local_run_names_the_fix_for_missing_inputs(tmp_path):
    with pytest.raises(LocalRunError, match="make data"):
        run_locally(data=tmp_path / "missing.parquet", root=tmp_path / "runs")
    with pytest.raises(LocalRunError, match="make compile"):
        run_locally(data=Path("configs/data/synthetic.yaml"), package=tmp_path / "none.yaml", root=tmp_path / "runs")


def test_a_failed_rerun_is_refused_not_replaced_by_its_source_runs_artifact(local_run, tmp_path, capsys):
    run_dir, _, _ = local_run
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path("configs/train/cpu_small.yaml").read_text().replace("batch_size:", "batchsize:"))
    failed = tmp_path / "p1-failed"
    assert stage_main(["train-phase1", "--run", str(run_dir), "--out", str(failed), "--train-config", str(typo)]) == 2
    assert "stage train-phase1 failed (exit 2)" in capsys.readouterr().err
    info = read_run_file(failed)
    assert info["status"] == "failed" and info["exit_code"] == 2
    assert "unknown key `training.batchsize`" in info["error"]  # the stage's own one-line reason
    assert not (failed / "train-phase1" / "checkpoint").exists()
    # the next stage against the failed rerun must not take Phase 1 from run_dir instead
    for stage, out in (("train-phase2", tmp_path / "p2"), ("report", tmp_path / "rep")):
        assert stage_main([stage, "--run", str(failed), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{failed.resolve()}: its `train-phase1` stage did not succeed (status 'failed': " in err, err
        assert "unknown key `training.batchsize`" in err and not out.exists()
    with pytest.raises(RunError, match="its `train-phase1` stage did not succeed"):
        find_artifact(failed, "train-phase1", "checkpoint")
    # what the failed rerun did not try to make still comes from its source, and says so
    assert find_artifact(failed, "validate", "validation") == find_artifact(run_dir, "validate", "validation")


def _hand_made_run(d: Path, info: dict) -> Path:
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"schema_version": 1, **info}))
    return d


def test_the_failed_task_of_a_pipeline_run_is_named(local_run, tmp_path, capsys):
    run_dir, _, _ = local_run
    params = read_run_file(run_dir)["params"]
    err_line = "Pipeline 'ple-adatt' finished with status FAILURE. Inner task failed: 'train-phase1'."
    bad = _hand_made_run(tmp_path / "failed-run", {"kind": "pipeline-run", "status": "failed", "error": err_line,
                                                  "params": params})
    assert stage_main(["train-phase2", "--run", str(bad), "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert f"{bad.resolve()}: its `train-phase1` stage did not succeed (status 'failed': {err_line})" in err
    # a stage rerun that never finished (killed: run.json still says running) is refused the same way
    killed = _hand_made_run(tmp_path / "killed", {"kind": "stage-rerun", "stage": "train-phase2", "status": "running",
                                                 "source_run": str(run_dir), "params": params})
    with pytest.raises(RunError, match=r"killed: its `train-phase2` stage did not succeed \(status 'running' "
                                       r"\(still running, or killed before it finished\)\)"):
        rerun_stage("report", killed, out=tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_a_stage_that_raises_is_recorded_as_failed(local_run, tmp_path, capsys):
    """Not only a stage's SystemExit: any exception marks run.json failed, with the error and traceback."""
    run_dir, _, _ = local_run
    params = {**read_run_file(run_dir)["params"], "gx_rows": 5}  # an int, not the string the component passes on
    src = _hand_made_run(tmp_path / "edited", {"kind": "stage-rerun", "stage": "report", "status": "succeeded",
                                              "source_run": str(run_dir), "params": params})
    out = tmp_path / "v"
    assert stage_main(["validate", "--run", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "make stage: error: stage validate raised " in err and f"the traceback is in {out / 'run.json'}" in err
    info = read_run_file(out)
    assert info["status"] == "failed" and info["error"].split(":")[0].endswith("Error")
    assert "Traceback" in info["traceback"] and info["seconds"] >= 0


def test_a_bad_override_fails_before_any_step_runs(tmp_path):
    from ple_adatt.data.synthetic import write_parquet

    data = write_parquet(tmp_path / "tiny.parquet", rows=300, seed=1)
    with pytest.raises(LocalRunError, match=r"\+ --set: key `transfer.adatt.freeze_epoch` \(0\) must be greater"):
        run_locally(data=data, overrides=["transfer.adatt.warmup_epochs=0", "transfer.adatt.freeze_epoch=0"],
                    root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_failed_step_shows_progress_and_its_own_error_line_first(tmp_path, capsys, monkeypatch):
    """The terminal gets each step's start and end and, on failure, the stage's one-line
    reason first (not kfp's executor output), the step's name and the rerun command."""
    import polars as pl

    from ple_adatt.data.synthetic import write_parquet

    data = write_parquet(tmp_path / "tiny.parquet", rows=600, seed=1)
    bad = tmp_path / "inf.parquet"
    pl.read_parquet(data).with_columns(pl.lit(float("inf")).alias("num_00")).write_parquet(bad)
    package = tmp_path / "pipeline.yaml"
    assert compile_main(["--out", str(package)]) == 0
    import pipelines.local as local_mod

    written = []  # the file the steps' output goes to while the run goes, and whether it exists then
    init = local_mod._Progress.__init__

    def spy(self, log, *args, **kwargs):
        written.append((Path(log.name), Path(log.name).exists()))
        init(self, log, *args, **kwargs)

    monkeypatch.setattr(local_mod._Progress, "__init__", spy)
    with pytest.raises(LocalRunError) as e:
        run_locally(data=bad, package=package, root=tmp_path / "runs",
                    mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    lines = str(e.value).splitlines()
    assert lines[0].startswith("ple-adatt validate: error: ") and "num_00" in lines[0]
    assert "\x1b[" not in str(e.value)  # no terminal colour codes
    assert lines[-1].startswith("fix it and rerun that step: make stage STAGE=validate RUN=")
    err = capsys.readouterr().err
    assert "validate ..." in err and "validate failure" in err
    # the path printed at the start is the file being written during the run (tail -f finds it);
    # it then moves into the run directory, leaving no orphan
    ((live, existed),) = written
    assert existed and f"step output: {live} while it runs" in err.replace(str(Path.cwd()) + "/", "")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not live.exists() and (run_dir / "pipeline.log").exists()


def test_ctrl_c_stops_the_run_in_one_line_and_leaves_a_run_make_stage_goes_on_from(tmp_path, monkeypatch, capsys):
    """SIGINT to the process group (what Ctrl-C and `timeout -s INT` send) while train-phase1 runs."""
    import os
    import signal
    import subprocess
    import sys

    import mlflow

    from ple_adatt.data.synthetic import write_parquet

    data = write_parquet(tmp_path / "tiny.parquet", rows=1500, seed=1)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.local", "--data", str(data), "--root", str(tmp_path / "runs"),
         "--mlflow-tracking-uri", tracking, "--set", "training.shared_expert_epochs=50"],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    seen = []
    for line in proc.stderr:  # wait until validate has finished and train-phase1 runs
        seen.append(line)
        if "train-phase1 ..." in line:
            break
    else:
        pytest.fail(f"train-phase1 never started: {''.join(seen)}")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("make run: interrupted (Ctrl-C) during train-phase1; finished: validate; run ")
    assert "go on with: make stage STAGE=train-phase1 RUN=" in last
    (run_dir,) = (tmp_path / "runs").iterdir()  # no orphan .<pid>.pipeline.log beside it
    assert (run_dir / "pipeline.log").exists()
    info = read_run_file(run_dir)
    assert info["status"] == "interrupted" and info["failed_task"] == "train-phase1"
    assert info["tasks"] == {"validate": "success", "train-phase1": "interrupted"}
    # MLflow: the parent is not FINISHED, the interrupted stage is KILLED
    client = mlflow.MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("ple-adatt").experiment_id],
                              f"tags.pipeline_run_id = '{info['pipeline_run_id']}'")
    status = {r.data.tags.get("stage", "parent"): r.info.status for r in runs}
    # (train-phase1 has a run only if the interrupt came after it reached MLflow; KILLED then, by itself;
    # before that the parent is left RUNNING by validate and the launcher marks it)
    assert {**status, "train-phase1": status.get("train-phase1", "KILLED")} == {
        "parent": "KILLED", "validate": "FINISHED", "train-phase1": "KILLED"}
    # make stage goes on from it: what finished is used, what was interrupted is refused
    assert find_artifact(run_dir, "validate", "validation").is_dir()
    with pytest.raises(RunError, match=r"its `train-phase1` stage did not succeed \(status 'interrupted'"):
        find_artifact(run_dir, "train-phase1", "checkpoint")
    with pytest.raises(RunError, match=r"that run stopped \(status 'interrupted'\) before its `train-phase2` stage "
                                       r"ran\. Run that stage first \(make stage STAGE=train-phase2"):
        find_artifact(run_dir, "train-phase2", "checkpoint")  # what register and report ask for
    # $MLFLOW_TRACKING_URI (make stage ... MLFLOW_TRACKING_URI=...) wins over the URI in run.json
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    out_dir = tmp_path / "p1"
    assert stage_main(["train-phase1", "--run", str(run_dir), "--out", str(out_dir), *sum((["--set", s] for s in FAST), [])]) == 0
    rec = read_run_file(out_dir)
    assert rec["mlflow_tracking_uri"] == other and rec["mlflow_tracking_uri_from"] == "$MLFLOW_TRACKING_URI"
    assert mlflow.MlflowClient(tracking_uri=other).search_runs(
        [mlflow.MlflowClient(tracking_uri=other).get_experiment_by_name("ple-adatt").experiment_id],
        "tags.stage = 'train-phase1'")
    assert os.environ["MLFLOW_TRACKING_URI"] == other  # the in-process rerun put the environment back


def test_the_summary_names_how_to_open_a_tracking_server(tmp_path):
    from pipelines.runs import describe_tracking

    line = describe_tracking("http://127.0.0.1:5124", "1234")
    assert "mlflow ui" not in line and "open http://127.0.0.1:5124 in a browser" in line
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in describe_tracking("sqlite:////x/mlflow.db")


def test_make_stage_says_which_run_it_picked(local_run, tmp_path, monkeypatch, capsys):
    run_dir, _, _ = local_run
    monkeypatch.chdir(tmp_path)
    newest = _hand_made_run(tmp_path / "runs" / "local" / "ple-adatt-9999", {
        "kind": "pipeline-run", "status": "failed", "params": read_run_file(run_dir)["params"],
        "error": "Pipeline 'ple-adatt' finished with status FAILURE. Inner task failed: 'validate'."})
    assert stage_main(["report", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"RUN not given; using the newest run {Path('runs/local') / newest.name} (status failed)" in err


def test_the_summary_says_when_nothing_was_registered_or_a_version_was_reused():
    from pipelines.runs import describe_registration

    new = {"registered": True, "created": True, "model_name": "ple-adatt", "version": "3", "aliases": ["candidate"]}
    assert describe_registration(new) == "model ple-adatt version 3 (alias candidate)"
    reused = {**new, "created": False}
    assert describe_registration(reused).endswith("(reused: the same checkpoint was registered before)")
    skipped = {"registered": False, "skipped": "tracking is off", "version": None, "model_name": "ple-adatt"}
    assert describe_registration(skipped) == "nothing (tracking is off)"


def test_every_step_has_the_output_an_interrupted_run_checks_for():
    """After Ctrl-C a step whose main output exists counts as finished; that output must be the
    one the next stages read (pipelines.runs.UPSTREAM), and the register step's registration."""
    from pipelines.local import MAIN_OUTPUT
    from pipelines.runs import UPSTREAM

    assert set(MAIN_OUTPUT) == set(TASKS)
    for needs in UPSTREAM.values():
        for task, output in needs.values():
            if task != "dataset":
                assert MAIN_OUTPUT[task] == output, (task, output)
    assert MAIN_OUTPUT["register"] == "registration"


def test_the_summary_of_an_untracked_run_names_no_store(tmp_path):
    from pipelines.runs import write_run_file

    write_run_file(tmp_path, {"kind": "pipeline-run", "status": "succeeded", "tracking": False,
                              "mlflow_tracking_uri": "sqlite:////x/mlflow.db"})
    text = summarize_run(tmp_path)
    assert "MLflow: not tracked (PLE_ADATT_NO_TRACKING=1)" in text and "mlflow ui" not in text


@pytest.mark.parametrize(("env", "explicit", "origin"), [
    ("localhost:5000", None, "$MLFLOW_TRACKING_URI"),
    (None, "localhost:5000", "--mlflow-tracking-uri"),
])
def test_a_malformed_tracking_uri_fails_before_any_step_runs(tmp_path, monkeypatch, env, explicit, origin):
    """make run MLFLOW_TRACKING_URI=localhost:5000 used to fail in its first step, leaving a failed
    run directory whose run.json then carried the bad URI into make stage."""
    from ple_adatt.data.synthetic import write_parquet

    data = write_parquet(tmp_path / "tiny.parquet", rows=300, seed=1)
    monkeypatch.delenv("PLE_ADATT_NO_TRACKING", raising=False)
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    with pytest.raises(LocalRunError, match=rf"'localhost:5000' \(from {re.escape(origin)}\) cannot be used: it is a "
                                            r"host and port without a scheme \(did you mean http://localhost:5000\?\)"):
        run_locally(data=data, root=tmp_path / "runs", mlflow_tracking_uri=explicit)
    assert not (tmp_path / "runs").exists()


def test_a_tracking_uri_the_stages_would_refuse_fails_before_any_step_runs(tmp_path, monkeypatch):
    import pipelines.local as local
    from ple_adatt.data.synthetic import write_parquet

    data = write_parquet(tmp_path / "tiny.parquet", rows=300, seed=1)
    monkeypatch.delenv("PLE_ADATT_NO_TRACKING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(LocalRunError, match=r"the directory .*missing-dir.* does not exist"):
        run_locally(data=data, root=tmp_path / "runs",
                    mlflow_tracking_uri=f"sqlite:///{tmp_path / 'missing-dir' / 'mlflow.db'}")
    with pytest.raises(LocalRunError, match=r"tracking.require_server is true .* \(from --mlflow-tracking-uri\)"):
        run_locally(data=data, root=tmp_path / "runs", overrides=["tracking.require_server=true"],
                    mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "runs").exists()

    def reached(package):  # past the pre-checks: the pipeline would run now
        raise LocalRunError("pre-checks passed")

    monkeypatch.setattr(local, "_load_pipeline", reached)
    monkeypatch.setenv("PLE_ADATT_NO_TRACKING", "1")  # the steps track nothing: their URI is not used
    with pytest.raises(LocalRunError, match="pre-checks passed"):
        run_locally(data=data, root=tmp_path / "runs", mlflow_tracking_uri="localhost:5000")
    monkeypatch.delenv("PLE_ADATT_NO_TRACKING")
    with pytest.raises(LocalRunError, match="pre-checks passed"):
        run_locally(data=data, root=tmp_path / "runs", mlflow_tracking_uri="http://127.0.0.1:1")
