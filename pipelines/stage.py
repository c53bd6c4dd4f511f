"""``python -m pipelines.stage``: rerun one stage against the artifacts of an earlier local run.

    python -m pipelines.stage train-phase2 --run runs/local/ple-adatt-<timestamp> \\
        --set training.cluster_finetune_epochs=3

What ``make stage STAGE=... RUN=... SET=...`` does. The stage's component function runs
here (the same code as in the pipeline, the KFP artifacts built from paths), its inputs are
the upstream outputs of RUN, and its outputs go to a new directory (default
``runs/stages/<stage>-<timestamp>``) laid out like a run: ``<task>/<output>`` plus a
``run.json`` naming RUN as its source. RUN itself is only read. The new directory is a run
directory too, so the next stage can be rerun against it (``--run <new dir>``): the
artifacts it lacks come from its source, and the summary says which input came from where.
An input whose stage failed or never finished in RUN (a failed rerun, the failed task of a
pipeline run) is refused, never replaced by an older run's artifact. ``run.json`` says
``running`` while the stage runs and ``succeeded`` or ``failed`` (with the error) after.

MLflow: ``--mlflow-tracking-uri``, else ``$MLFLOW_TRACKING_URI`` (``make stage ...
MLFLOW_TRACKING_URI=...``), else the URI recorded in RUN's ``run.json``. Run it from the
repository root (``python -m``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ple_adatt.artifacts import is_within

from .runs import (
    UPSTREAM,
    RunError,
    artifact_origin,
    find_artifact,
    latest_run,
    read_run_file,
    write_run_file,
)

DEFAULT_OUT_ROOT = Path("runs/stages")
_SKIP = ", or PLE_ADATT_NO_TRACKING=1 to rerun without MLflow"


def _component(stage: str) -> Any:
    from components.build import load

    return load(stage)


def _artifact(schema_type: str, uri: Path) -> Any:
    """A KFP artifact object of the component's declared type (``system.Model@0.0.1``, ...)."""
    from kfp import dsl

    title = schema_type.split("@")[0]
    classes = {cls.schema_title: cls for cls in (dsl.Artifact, dsl.Dataset, dsl.Model, dsl.Metrics, dsl.HTML,
                                                 dsl.Markdown, dsl.ClassificationMetrics, dsl.SlicedClassificationMetrics)}
    if title not in classes:
        raise RunError(f"artifact type {schema_type} is not supported by the stage runner")
    cls = classes[title]
    return cls(name=uri.name, uri=str(uri))


class _Tee(io.TextIOBase):
    """stderr that also keeps a copy: the stage's one-line reason goes into run.json."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        return self.copy.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:  # subprocesses and faulthandler write to the real stream
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    def reason(self, stage: str) -> str | None:
        lines = [ln for ln in self.copy.getvalue().splitlines() if ln.startswith(f"ple-adatt {stage}: ")]
        return lines[-1] if lines else None


#: the train-config input each stage that takes overrides applies them to: its train_config
#: parameter, or the train config recorded in the manifest of this checkpoint input
_OVERRIDE_BASE = {"train-phase2": "phase1_checkpoint", "register": "checkpoint"}


def _check_overrides(stage: str, new: list[str], params: dict[str, Any], inputs: dict[str, str], *,
                     takes_overrides: bool) -> None:
    """``--set`` fails here, in one line, before the new directory or an MLflow run exists: a stage
    without train-config overrides refuses it (it would only be recorded, and break a later rerun
    from the new directory); the others load their train config with every override."""
    from ple_adatt.config import (
        ConfigError,
        apply_overrides,
        load_data_config,
        load_train_config,
        train_config_from_dict,
    )

    if not new:
        return
    if not takes_overrides:
        raise RunError(f"stage {stage} takes no train-config overrides (SET= / --set {new[0]!r}); drop them "
                       "(they apply to train-phase1, train-phase2 and register)")
    everything = list(params.get("overrides") or [])  # the run's own plus the new ones
    try:
        if stage in _OVERRIDE_BASE:
            manifest = Path(inputs[_OVERRIDE_BASE[stage]]) / "manifest.json"
            try:
                raw = json.loads(manifest.read_text())["train_config"]
            except (OSError, ValueError, KeyError):
                return  # no readable manifest: the stage itself names the problem
            train_config_from_dict(apply_overrides(raw, everything, "--set"), f"{manifest} train_config + --set")
            if stage == "register":  # it reads registry.* and tracking.* only: others would be recorded, ignored
                from ple_adatt.stages.register import refuse_ignored_overrides

                refuse_ignored_overrides(raw, everything, f"{manifest} train_config")
        elif params.get("train_config"):
            data_cfg = load_data_config(params["data_config"]) if params.get("data_config") else None
            load_train_config(params["train_config"], everything, data=data_cfg)
    except ConfigError as e:
        raise RunError(str(e)) from None


def _check_report_matches(inputs: dict[str, str], src: Path) -> None:
    """register: the report it bundles must be of the checkpoint it registers. After a
    train-phase2 rerun, RUN's report is its source run's, made from the old checkpoint."""
    from ple_adatt.registry import report_of_another_checkpoint

    ckpt, report = Path(inputs["checkpoint"]), Path(inputs["report"])
    try:
        mismatch = report_of_another_checkpoint(json.loads((ckpt / "manifest.json").read_text()),
                                                json.loads((report / "manifest.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return  # an unreadable manifest: the stage itself names the problem
    if mismatch:
        made_from, ck_sha = mismatch
        raise RunError(f"the report {report} describes the Phase 2 checkpoint {made_from[:12]}, not {ck_sha[:12]} "
                       f"({ckpt}) that register would register; rerun report for this checkpoint: make stage "
                       f"STAGE=report RUN={src}, then register against that rerun's directory")


def rerun_stage(
    stage: str,
    run: str | Path,
    *,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    data: str | Path | None = None,
    data_config: str | Path | None = None,
    train_config: str | Path | None = None,
    mlflow_tracking_uri: str | None = None,
) -> Path:
    """Run ``stage`` on the upstream artifacts of ``run``; return the new directory (RunError on bad input)."""
    if stage not in UPSTREAM:
        raise RunError(f"unknown stage {stage!r}; valid: {', '.join(UPSTREAM)}")
    src = Path(run).resolve()
    info = read_run_file(src)
    params = dict(info.get("params", {}))
    if data is not None:
        if not Path(data).exists():
            raise RunError(f"dataset not found: {data}")
        params["data_uri"] = str(Path(data).resolve())
    if data_config is not None:
        params["data_config"] = str(Path(data_config).resolve())
    if train_config is not None:
        params["train_config"] = str(Path(train_config).resolve())
    # the URI the stage tracks to, and how a user changes it (named in the stage's MLflow errors)
    if mlflow_tracking_uri is not None:
        uri_origin, fix = "--mlflow-tracking-uri", f"pass another --mlflow-tracking-uri{_SKIP}"
    elif os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        mlflow_tracking_uri = os.environ["MLFLOW_TRACKING_URI"].strip()
        uri_origin, fix = "$MLFLOW_TRACKING_URI", f"fix MLFLOW_TRACKING_URI{_SKIP}"
    else:
        mlflow_tracking_uri = params.get("mlflow_tracking_uri") or ""
        uri_origin = f"{src / 'run.json'}, the store that run used"
        fix = f"set MLFLOW_TRACKING_URI=<uri> to use another (make stage ... MLFLOW_TRACKING_URI=<uri>){_SKIP}"
    params["mlflow_tracking_uri"] = mlflow_tracking_uri
    params["overrides"] = list(params.get("overrides", [])) + list(overrides or [])

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    dest = Path(out) if out is not None else DEFAULT_OUT_ROOT / f"{stage}-{stamp}"
    dest = dest.resolve()
    if dest.exists():
        raise RunError(f"{dest} already exists; a rerun writes to a new directory (drop --out or pick another)")
    if is_within(dest, src) or is_within(src, dest):
        raise RunError(f"{dest} overlaps the source run {src}; a rerun never writes into its source")

    component = _component(stage)
    spec = component.component_spec
    kwargs: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    input_runs: dict[str, str] = {}  # inputs taken from a source run of RUN, not from RUN itself
    for name, (task, output) in UPSTREAM[stage].items():
        if task == "dataset":
            path = Path(params.get("data_uri", ""))
            if not path.exists():
                raise RunError(f"the dataset {path} of run {src} is gone; pass --data PATH (make stage ... DATA=PATH)")
        else:
            path = find_artifact(src, task, output)
            origin = artifact_origin(src, path)
            if origin is not None:
                input_runs[name] = str(origin)
        inputs[name] = str(path)
        kwargs[name] = _artifact(spec.inputs[name].type, path)
    outputs: dict[str, str] = {}
    for name, out_spec in spec.outputs.items():
        path = dest / stage / name
        outputs[name] = str(path)
        kwargs[name] = _artifact(out_spec.type, path)
    accepted = set(inspect.signature(component.python_func).parameters)
    _check_overrides(stage, list(overrides or []), params, inputs, takes_overrides="overrides" in accepted)
    if stage == "register":
        _check_report_matches(inputs, src)
    for key in ("data_config", "train_config", "gx_rows", "overrides", "mlflow_tracking_uri"):
        if key in accepted and key in params:
            kwargs[key] = params[key]
    if "pipeline_run_id" in accepted:
        kwargs["pipeline_run_id"] = f"stage-{stage}-{stamp}"

    (dest / stage).mkdir(parents=True)
    record = {"kind": "stage-rerun", "stage": stage, "source_run": str(src), "params": params, "inputs": inputs,
              "input_runs": input_runs, "outputs": outputs, "mlflow_tracking_uri": params.get("mlflow_tracking_uri"),
              "mlflow_tracking_uri_from": uri_origin, "status": "running"}
    write_run_file(dest, record)
    t0 = time.perf_counter()

    def failed(error: str, status: str = "failed", **extra: Any) -> None:
        record.update(status=status, error=error, seconds=round(time.perf_counter() - t0, 1), **extra)
        write_run_file(dest, record)

    from ple_adatt.tracking import ORIGIN_ENV, origin_env, restored_environ

    tee = _Tee(sys.stderr)
    # the component sets these for its stage (run in this process here): put them back afterwards
    with restored_environ("MLFLOW_TRACKING_URI", ORIGIN_ENV, "PLE_ADATT_PIPELINE_RUN_ID"):
        if mlflow_tracking_uri:
            os.environ.update(origin_env(mlflow_tracking_uri, uri_origin, fix))
        try:
            with contextlib.redirect_stderr(tee):
                component.python_func(**kwargs)
            metadata = {name: kwargs[name].metadata for name in spec.outputs}
            for name, out_spec in spec.outputs.items():  # KFP keeps Metrics as metadata only; a file is handier here
                if out_spec.type.startswith("system.Metrics") and not Path(outputs[name]).exists():
                    Path(outputs[name]).write_text(json.dumps(metadata[name], indent=1, sort_keys=True) + "\n")
        except SystemExit as e:  # the stage printed its one-line reason
            if e.code in (130, 143):  # Ctrl-C / SIGTERM: the stage removed its partial output
                failed("interrupted", status="interrupted", exit_code=e.code)
                raise KeyboardInterrupt from None
            failed(tee.reason(stage) or f"ple-adatt {stage} exited with {e.code}", exit_code=e.code)
            raise RunError(f"stage {stage} failed (exit {e.code}); its inputs and run.json are in {dest}") from None
        except KeyboardInterrupt:
            failed("interrupted", status="interrupted")
            raise
        except BaseException as e:  # a bug or an unexpected error: recorded, never left as "running"
            failed(f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            if not isinstance(e, Exception):
                raise
            raise RunError(f"stage {stage} raised {type(e).__name__}: {e}; "
                           f"the traceback is in {dest / 'run.json'}") from e
    record.update(status="succeeded", seconds=round(time.perf_counter() - t0, 1), metadata=metadata)
    write_run_file(dest, record)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stage", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(UPSTREAM), help="the stage to rerun")
    parser.add_argument("--run", help="run directory to take the upstream artifacts from "
                        "(default: the newest under runs/local)")
    parser.add_argument("--out", help="new directory for the outputs (default runs/stages/<stage>-<timestamp>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train-config override added to the run's own, e.g. --set training.cluster_finetune_epochs=3")
    parser.add_argument("--data", help="dataset to use instead of the run's")
    parser.add_argument("--data-config", help="data config instead of the run's")
    parser.add_argument("--train-config", help="train config instead of the run's (train-phase1)")
    parser.add_argument("--mlflow-tracking-uri", help="default $MLFLOW_TRACKING_URI, else the run's (its run.json)")
    from ple_adatt.cli import parse_args_strictly  # stdlib only at import

    args = parse_args_strictly(parser, argv)  # a misspelt option gets "did you mean ...?"
    try:
        if args.run:
            run = Path(args.run)
        else:
            run = latest_run("runs/local")
            status = read_run_file(run).get("status", "?")
            print(f"make stage: RUN not given; using the newest run {run} (status {status}); "
                  "RUN=<dir> picks another", file=sys.stderr)
        dest = rerun_stage(args.stage, run, out=args.out, overrides=args.overrides, data=args.data,
                           data_config=args.data_config, train_config=args.train_config,
                           mlflow_tracking_uri=args.mlflow_tracking_uri)
    except RunError as e:
        print(f"make stage: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"make stage: {args.stage} interrupted (Ctrl-C); its partial output was removed, the run it "
              "read is unchanged", file=sys.stderr)
        return 130
    info = read_run_file(dest)
    print(f"\n{args.stage} rerun against {run} ({info['seconds']:.0f}s); outputs in {dest}:")
    for name, path in info["outputs"].items():
        print(f"  {name:<16} {path}")
    print("inputs:")
    for name, path in info["inputs"].items():
        origin = info.get("input_runs", {}).get(name)
        print(f"  {name:<18} {path}" + (f"  (from its source run {origin}: not rerun in {run})" if origin else ""))
    from .pipeline import TASKS

    later = TASKS[TASKS.index(args.stage) + 1:] if args.stage in TASKS else ()
    if later:
        print(f"rerun the next stage against it: make stage STAGE={later[0]} RUN={dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
