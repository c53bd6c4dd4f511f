"""``python -m pipelines.local``: run the compiled pipeline on this machine with kfp.local.

    python -m pipelines.local --package build/ple-adatt-pipeline.yaml --data data/synthetic.parquet \\
        --train-config configs/train/cpu_small.yaml [--set training.shared_expert_epochs=2]

This is what ``make run`` does after ``make compile``: the very IR YAML that goes to Kubeflow
runs through kfp.local's SubprocessRunner in this virtualenv (the components' code is the
image's code: the ple-adatt package installed here). GPU requests, tolerations and /dev/shm
are Kubernetes settings and do nothing locally. Each step's output goes to
``runs/local/.<pid>.pipeline.log`` while the run goes (the path is printed first; ``tail -f`` it),
which moves to ``runs/local/ple-adatt-<timestamp>/pipeline.log`` when it ends; the terminal gets the step progress (each
step's start and end, with times), a failed step's own error line, and a summary. The train
and data configs (with ``--set``) and the tracking URI are checked before anything runs. MLflow
defaults to the project's sqlite store (``$MLFLOW_TRACKING_URI`` wins).

Ctrl-C stops the run in one line (exit 130): the running step gets the same SIGINT and marks
its MLflow run KILLED, the run directory gets its ``run.json`` (``"status": "interrupted"``,
which steps finished), so ``make stage`` can go on from it, and the pipeline's MLflow parent
run is marked KILLED if no step could. Run it from the repository root (``python -m``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .runs import RUN_FILE, UPSTREAM, failed_task, summarize_run, write_run_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = Path("runs/local")
LOG_FILE = "pipeline.log"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LocalRunError(RuntimeError):
    """The local run could not start or a step failed; the message says where to look."""


class LocalRunInterrupted(LocalRunError):
    """Ctrl-C (SIGINT) stopped the run; the message is one line: what finished, where, how to go on."""


_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_STAGE_ERROR = re.compile(r"(ple-adatt [\w-]+: error: .*)")
#: what ple_adatt.tracking.stage_run prints when a stage's MLflow run starts
_MLFLOW_RUN = re.compile(r"MLflow: stage ([\w-]+) -> run (\w+) \(pipeline run ([^)\s]+)\) at (\S+)")


class _Progress(io.TextIOBase):
    """Where kfp.local's output goes: all of it to pipeline.log (and, with ``echo``, to the
    terminal's stdout); each step's start and end, with elapsed times, to the terminal (stderr);
    the steps' own one-line errors kept for the end; each step's status and MLflow run."""

    def __init__(self, log: Any, t0: float, terminal: Any = None, echo: Any = None) -> None:
        self.log, self.t0, self.terminal, self.echo = log, t0, terminal or sys.stderr, echo
        self.buf, self.started, self.stage_errors = "", {}, []
        self.tasks: dict[str, str] = {}  # task -> running | success | failure (kfp's words, lower case)
        self.mlflow: dict[str, Any] = {}  # the last stage's MLflow run: stage_run_id, pipeline_run_id, uri

    def write(self, s: str) -> int:
        self.log.write(s)
        if self.echo is not None:
            self.echo.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def _line(self, line: str) -> None:
        now = time.perf_counter()
        if m := _STARTED.search(line):
            self.started[m.group(1)] = now
            if m.group(1) != "importer":
                self.tasks[m.group(1)] = "running"
                if self.echo is None:
                    print(f"  [{now - self.t0:5.0f}s] {m.group(1)} ...", file=self.terminal, flush=True)
        elif (m := _FINISHED.search(line)) and m.group(1) != "importer":
            self.tasks[m.group(1)] = m.group(2).lower()
            took = now - self.started.get(m.group(1), now)
            if self.echo is None:
                print(f"  [{now - self.t0:5.0f}s] {m.group(1)} {m.group(2).lower()} ({took:.0f}s)",
                      file=self.terminal, flush=True)
        elif m := _STAGE_ERROR.search(line):
            self.stage_errors.append(m.group(1).strip())
        elif m := _MLFLOW_RUN.search(line):
            self.mlflow = {"stage_run_id": m.group(2), "pipeline_run_id": m.group(3), "uri": m.group(4)}

    def finished(self) -> list[str]:
        return [t for t, st in self.tasks.items() if st == "success"]

    def unfinished(self) -> str | None:
        """The step that was running (interrupted), if any."""
        return next((t for t, st in self.tasks.items() if st == "running"), None)


#: each step's output that its stage renames into place last: present means the step succeeded
#: (the outputs later stages read, and the register step's registration)
MAIN_OUTPUT = {task: output for needs in UPSTREAM.values() for task, output in needs.values() if task != "dataset"}
MAIN_OUTPUT["register"] = "registration"


def _pipeline_tasks() -> tuple[str, ...]:
    from .pipeline import TASKS

    return TASKS


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            out += [int(x) for x in f.read_text().split()]
    return out


def _descendants(pid: int) -> list[int]:
    todo, seen = _children(pid), []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _wait_for_steps(grace_s: float = 10.0) -> None:
    """After Ctrl-C: let the step that was running (kfp.local's child ``sh -c ... executor_main``)
    end. It got the same SIGINT (the terminal signals the whole process group) and marks its MLflow
    run KILLED on the way out; one still running after ``grace_s`` (only this process was
    signalled) gets SIGTERM, which a stage handles the same way. Linux (/proc); elsewhere a no-op."""
    steps = []
    for pid in _children(os.getpid()):
        with contextlib.suppress(OSError):
            if b"executor_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                steps.append(pid)
    deadline, terminated = time.monotonic() + grace_s, False
    while steps:
        for pid in list(steps):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                done = True
            if done:
                steps.remove(pid)
        if not steps:
            return
        if time.monotonic() > deadline:
            if terminated:
                return  # leave it; it is no longer ours to wait for
            for pid in steps:
                for p in [pid, *_descendants(pid)]:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGTERM)
            deadline, terminated = time.monotonic() + grace_s, True
        time.sleep(0.1)


def _check_configs(params: dict[str, Any]) -> Any:
    """The configs (and --set) fail here, in one line, before kfp.local starts a step; the train config."""
    from ple_adatt.config import ConfigError, load_data_config, load_train_config

    try:
        return load_train_config(params["train_config"], params["overrides"],
                                 data=load_data_config(params["data_config"]))
    except ConfigError as e:
        raise LocalRunError(str(e)) from None


def _check_tracking(train_cfg: Any, uri: str, origin: str, fix: str) -> None:
    """The tracking URI fails here, in one line naming where it came from, as every step's
    tracking would refuse it (a host and port without a scheme, a sqlite store in a directory
    that does not exist, a local store under ``tracking.require_server``): the stages' own
    checks, before any step runs or a run directory is made. Moot when the steps track nothing."""
    from ple_adatt.stages.common import no_tracking_env
    from ple_adatt.tracking import (
        ORIGIN_ENV,
        TrackingError,
        check_uri,
        origin_env,
        resolve_target,
        restored_environ,
    )

    if no_tracking_env():
        return
    with restored_environ("MLFLOW_TRACKING_URI", ORIGIN_ENV):
        os.environ.update(origin_env(uri, origin, fix))  # what the steps get
        try:
            check_uri(resolve_target(train_cfg.tracking))
        except TrackingError as e:
            raise LocalRunError(str(e)) from None


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded store ``sqlite:///<project>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def _load_pipeline(package: str | Path | None) -> Any:
    """The pipeline as kfp.local runs it: the compiled IR, without retry policies.

    Retries are for transient cluster failures (a preempted node); kfp.local honours them with
    the same backoff, which would only delay the report of a deterministic local failure.
    """
    import tempfile

    import yaml
    from kfp import components as kfp_components

    if package is None:
        from .pipeline import compile_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            text = Path(compile_pipeline(f"{tmp}/pipeline.yaml")).read_text()
    else:
        p = Path(package)
        if not p.exists():
            raise LocalRunError(f"{p}: no compiled pipeline; run `make compile` (or drop --package)")
        text = p.read_text()
    spec = next(iter(yaml.safe_load_all(text)))  # the pipeline spec; the Kubernetes platform spec is moot here
    for task in spec.get("root", {}).get("dag", {}).get("tasks", {}).values():
        task.pop("retryPolicy", None)
    return kfp_components.load_component_from_text(yaml.safe_dump(spec, sort_keys=False))


def _abs(path: str | Path, what: str, fix: str) -> str:
    p = Path(path)
    if not p.exists():
        raise LocalRunError(f"{what} not found: {p}; {fix}")
    return str(p.resolve())


def _tracking_origin(explicit: str | None) -> tuple[str, str, str]:
    """The URI the steps track to, where it came from and what to change, in the user's words."""
    if explicit:
        return explicit, "--mlflow-tracking-uri", "pass another --mlflow-tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI", "fix MLFLOW_TRACKING_URI"
    return (default_tracking_uri(), "make run's default store ./mlflow.db ($MLFLOW_TRACKING_URI is not set)",
            "set MLFLOW_TRACKING_URI=<uri> for make run (tracking.tracking_uri of the train config does not "
            "apply to make run)")


def run_locally(
    *,
    data: str | Path,
    package: str | Path | None = None,
    data_config: str | Path = "configs/data/synthetic.yaml",
    train_config: str | Path = "configs/train/cpu_small.yaml",
    overrides: list[str] | None = None,
    root: str | Path = DEFAULT_ROOT,
    mlflow_tracking_uri: str | None = None,
    gx_rows: str = "100000",
    echo: bool = False,
) -> Path:
    """Run the whole pipeline through kfp.local; return the run directory (raises LocalRunError)."""
    from kfp import local

    from ple_adatt.stages.common import no_tracking_env
    from ple_adatt.tracking import ORIGIN_ENV, end_parent_run, origin_env, restored_environ

    uri, origin, fix = _tracking_origin(mlflow_tracking_uri)
    params = {
        "data_uri": _abs(data, "dataset", "check DATA= / --data (make data generates the default synthetic one)"),
        "data_config": _abs(data_config, "data config", "pass --data-config configs/data/<name>.yaml"),
        "train_config": _abs(train_config, "train config", "pass --train-config configs/train/<name>.yaml"),
        "overrides": list(overrides or []),
        "mlflow_tracking_uri": uri,
        "gx_rows": gx_rows,
    }
    _check_tracking(_check_configs(params), uri, origin, fix)
    pipeline = _load_pipeline(package)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    log_path = root / f".{os.getpid()}.{LOG_FILE}"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    t0 = time.perf_counter()
    status, error = "succeeded", None
    # the run directory is kfp.local's to create: the log moves into it when the run ends
    log_path.touch()  # there for `tail -f` as soon as its path is printed
    print(f"running the pipeline with kfp.local (step output: {_rel(log_path)} while it runs, "
          f"then {_rel(root)}/<run>/{LOG_FILE})", file=sys.stderr, flush=True)
    progress: _Progress | None = None
    try:
        with restored_environ("MLFLOW_TRACKING_URI", ORIGIN_ENV):
            # the steps inherit this environment: their errors name where the URI came from, not the variable set here
            os.environ.update(origin_env(uri, origin, fix))
            with open(log_path, "w") as log, warnings.catch_warnings():
                # the images' code is installed in this venv: running it here is the point
                warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
                # resources, accelerators: Kubernetes settings, moot on this machine
                warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
                progress = _Progress(log, t0, echo=sys.stdout if echo else None)
                with contextlib.redirect_stdout(progress):
                    try:
                        pipeline(**params)
                    except RuntimeError as e:  # kfp.local: "Pipeline 'x' finished with status FAILURE. Inner task failed: 'y'."
                        status, error = "failed", _ANSI.sub("", str(e).strip().splitlines()[0])
                    except KeyboardInterrupt:
                        status = "interrupted"
                if status == "interrupted":
                    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting, still write run.json
                        _wait_for_steps()
    except KeyboardInterrupt:  # outside the pipeline call (opening the log, a second Ctrl-C while leaving it)
        status = "interrupted"
    tasks = dict(progress.tasks) if progress is not None else {}
    running = progress.unfinished() if progress is not None else None
    new = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in before and not p.name.startswith("."))
    if status == "interrupted":
        if new and running and (new[-1] / running / MAIN_OUTPUT[running]).exists():
            # Ctrl-C after the step wrote its output (stages rename it into place as their last act)
            # but before kfp.local reported it: the step succeeded
            tasks[running], running = "success", None
        if all(tasks.get(t) == "success" for t in _pipeline_tasks()):
            status = "succeeded"  # every step had finished: nothing was cut short
            print("make run: Ctrl-C came after the last step had finished; the run is complete", file=sys.stderr)
        else:
            error = f"interrupted (Ctrl-C) during {running}" if running else "interrupted (Ctrl-C) between steps"
            tasks = {t: ("interrupted" if st == "running" else st) for t, st in tasks.items()}
    mlflow_run = progress.mlflow if progress is not None else {}
    if status != "succeeded" and mlflow_run:
        # a step that failed before it reached MLflow, or a stop between steps: no step marked the parent run
        end_parent_run(mlflow_run["uri"], mlflow_run["stage_run_id"], "KILLED" if status == "interrupted" else "FAILED",
                       why=f"make run: {error}")
    if not new:
        log_path.unlink(missing_ok=True)
        if status == "interrupted":
            raise LocalRunInterrupted("interrupted before any step wrote its output; nothing to resume")
        raise LocalRunError(f"kfp.local made no run directory under {root}" + (f": {error}" if error else ""))
    run_dir = new[-1]
    log_path.rename(run_dir / LOG_FILE)
    from ple_adatt import __version__

    write_run_file(run_dir, {
        "kind": "pipeline-run", "status": status, "error": error,
        "failed_task": running if status == "interrupted" else failed_task({"error": error}),
        "tasks": tasks, "version": __version__,
        "package": str(Path(package).resolve()) if package else None, "params": params,
        "mlflow_tracking_uri": params["mlflow_tracking_uri"], "mlflow_tracking_uri_from": origin,
        "tracking": not no_tracking_env(),
        "pipeline_run_id": mlflow_run.get("pipeline_run_id"), "seconds": round(time.perf_counter() - t0, 1),
    })
    if status == "interrupted":
        done = [t for t, st in tasks.items() if st == "success"]
        nxt = running or next((t for t in _pipeline_tasks() if t not in done), None)
        resume = f"; go on with: make stage STAGE={nxt} RUN={_rel(run_dir)}" if nxt and done else ""
        raise LocalRunInterrupted(f"{error}; finished: {', '.join(done) or 'nothing'}; "
                                  f"run {_rel(run_dir)} (run.json, {LOG_FILE}){resume}")
    if error:
        stage = failed_task({"error": error}) or "<stage>"
        if progress.stage_errors:  # the step's own reason, as the stage printed it
            lines = progress.stage_errors[:1]
        elif echo:
            lines = []
        else:  # no one-line reason: the end of the step's output
            lines = [_ANSI.sub("", x) for x in (run_dir / LOG_FILE).read_text().splitlines()[-15:]]
        raise LocalRunError("\n".join([*lines, f"step {stage} failed: {error}", f"full log: {_rel(run_dir / LOG_FILE)}",
                                       f"fix it and rerun that step: make stage STAGE={stage} RUN={_rel(run_dir)}"]))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local", description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="compiled pipeline YAML (make compile); default: build it in-process")
    parser.add_argument("--data", required=True, help="dataset Parquet file or directory")
    parser.add_argument("--data-config", default="configs/data/synthetic.yaml")
    parser.add_argument("--train-config", default="configs/train/cpu_small.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train-config override, e.g. --set training.shared_expert_epochs=2 (repeatable)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="where run directories go (default runs/local)")
    parser.add_argument("--mlflow-tracking-uri", help="default $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db")
    parser.add_argument("--gx-rows", default="100000", help="rows the GX suite sees ('all' or a count)")
    parser.add_argument("--verbose", action="store_true", help="print every step's output here, not only to the log")
    from ple_adatt.cli import parse_args_strictly  # stdlib only at import

    args = parse_args_strictly(parser, argv)  # a misspelt option gets "did you mean ...?"
    try:
        run_dir = run_locally(data=args.data, package=args.package, data_config=args.data_config,
                              train_config=args.train_config, overrides=args.overrides, root=args.root,
                              mlflow_tracking_uri=args.mlflow_tracking_uri, gx_rows=args.gx_rows, echo=args.verbose)
    except LocalRunInterrupted as e:
        print(f"make run: {e}", file=sys.stderr)
        return 130
    except LocalRunError as e:
        print(f"local run failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any step started
        print("make run: interrupted (Ctrl-C) before any step ran", file=sys.stderr)
        return 130
    print()
    print(summarize_run(run_dir))
    print(f"every step's output: {_rel(run_dir / LOG_FILE)}")
    print(f"rerun one stage against this run: make stage STAGE=train-phase2 RUN={_rel(run_dir)} SET='training.cluster_finetune_epochs=3'")
    return 0


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


__all__ = ["RUN_FILE", "LocalRunError", "LocalRunInterrupted", "default_tracking_uri", "main", "run_locally"]

if __name__ == "__main__":
    sys.exit(main())
