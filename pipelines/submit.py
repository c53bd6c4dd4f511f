"""``python -m pipelines.submit``: upload the compiled pipeline as a new version and start a run.

    python -m pipelines.submit --host https://kfp.example.com --namespace team-recsys --token "$KFP_TOKEN" \\
        --experiment ple-adatt --data-uri s3://bucket/datasets/recsys.parquet \\
        --param mlflow_tracking_uri=http://mlflow.mlflow:5000 --set training.shared_expert_epochs=10

What ``make submit`` does, through ``kfp.Client``: the pipeline ``ple-adatt`` is created on
the first upload, later uploads add a version named ``<package version>-<UTC time>``; the
run starts in the experiment (created if missing) and its URL is printed. Host, namespace
and token also come from ``$KFP_HOST``, ``$KFP_NAMESPACE`` and ``$KFP_TOKEN``.

Before any request to the API the run parameters are checked: their names against the
compiled pipeline's inputs, the data and train configs they name (paths inside the image,
which holds this repository's ``configs/`` under ``/app``) loaded with the ``--set``
overrides, ``gx_rows``, and the MLflow tracking URI, which must be a server
(``http(s)://``): an empty or local one (sqlite, file) would leave every step's MLflow runs
in its pod, lost when the pod ends (``--allow-local-mlflow`` accepts that); a malformed one
(``mlflow:5000``, no scheme) is refused as the stages refuse it, opt-out or not. Then one
``GET /apis/v2beta1/healthz`` tells a refused token, a login redirect or a host that is not
a KFP API apart from an unreachable one. Every failure ends with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .compile import DEFAULT_OUT
from .pipeline import PIPELINE_NAME

PROG = "submit"
#: the repository root: the images hold its configs/ under their WORKDIR /app (docker/Dockerfile.*)
REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_WORKDIR = "/app"
HEALTHZ = "/apis/v2beta1/healthz"
_HOST_HINT = ("check --host / $KFP_HOST: the KFP API endpoint, e.g. https://kubeflow.example.com/pipeline, or "
              "http://localhost:8080 after kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80")
_TOKEN_HINT = "pass a valid token with --token or $KFP_TOKEN (and your profile namespace with --namespace)"


class SubmitError(RuntimeError):
    """Submission failed; the message is the one line the user sees."""


@dataclass(frozen=True)
class Submission:
    pipeline_id: str
    version_id: str
    experiment_id: str
    run_id: str
    run_url: str


def parse_params(items: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--param {item!r}: expected NAME=VALUE, e.g. --param gx_rows=all")
        params[key.strip()] = value
    return params


# ---- the checks before any request -------------------------------------------------------


def pipeline_inputs(package: str | Path) -> dict[str, dict[str, Any]]:
    """The compiled pipeline's run parameters: name -> its IR definition (parameterType, defaultValue, ...)."""
    import yaml

    pkg = Path(package)
    if not pkg.exists():
        raise SubmitError(f"{pkg}: no compiled pipeline; run `make compile` first")
    try:
        spec = next(iter(yaml.safe_load_all(pkg.read_text())))
        params = spec["root"]["inputDefinitions"]["parameters"]
    except (yaml.YAMLError, UnicodeDecodeError, OSError, StopIteration, KeyError, TypeError) as e:
        raise SubmitError(f"{pkg}: not a compiled pipeline ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "run `make compile`") from None
    if not isinstance(params, dict):
        raise SubmitError(f"{pkg}: root.inputDefinitions.parameters is not a mapping; run `make compile`")
    return params


#: the configs/ subdirectory of each config parameter's files
_CONFIG_DIRS = {"data_config": "data", "train_config": "train"}


def image_path(value: str, param: str, root: Path = REPO_ROOT) -> Path:
    """The file in this checkout that the image holds at ``value`` (relative to its WORKDIR /app)."""
    p = Path(value)
    if p.is_absolute():
        try:
            p = p.relative_to(IMAGE_WORKDIR)
        except ValueError:
            raise SubmitError(f"parameter {param}={value!r}: the images hold only this repository's configs/ "
                              f"(under {IMAGE_WORKDIR}); pass a path like configs/train/production.yaml") from None
    local = (root / p).resolve()
    configs = (root / "configs").resolve()
    if not local.is_relative_to(configs):
        raise SubmitError(f"parameter {param}={value!r}: not under configs/, so not in the images (they hold "
                          "only configs/ of this repository); pass a path like configs/train/production.yaml")
    if not local.is_file():
        kind = _CONFIG_DIRS.get(param, "*")  # a data config among the data configs, a train config among the train ones
        have = sorted(str(f.relative_to(root)) for f in configs.glob(f"{kind}/*.yaml"))
        raise SubmitError(f"parameter {param}={value!r}: no such file in configs/ of this checkout, so none in "
                          f"the images built from it; available: {', '.join(have)}")
    return local


def _is_server(uri: str) -> bool:
    return uri.strip().startswith(("http://", "https://"))


def _check_uri_form(uri: str, from_param: bool, train_config: str) -> None:
    """Refuse a tracking URI that every step would refuse as malformed (``mlflow:5000``, ``htp://...``),
    whatever --allow-local-mlflow says, with the stages' own check (``ple_adatt.tracking.check_uri``).
    A sqlite store is left alone: its directory is the pod's, not this machine's."""
    from ple_adatt.tracking import TrackingError, TrackingTarget, check_uri

    if not uri or uri.lower().startswith("sqlite:"):
        return
    if from_param:
        origin = "the pipeline parameter mlflow_tracking_uri"
        fix = "pass a tracking server with PARAMS='mlflow_tracking_uri=http://...' (--param mlflow_tracking_uri=...)"
    else:
        origin = f"tracking.tracking_uri of {train_config}"
        fix = f"fix tracking.tracking_uri in {train_config} (or --set tracking.tracking_uri=...)"
    target = TrackingTarget(uri=uri, experiment="", source="argument", retries=0, retry_wait_s=0.0,
                            artifact_location=None, origin_note=origin, fix_note=fix)
    try:
        check_uri(target)
    except TrackingError as e:
        raise SubmitError(str(e)) from None


def check_params(params: dict[str, Any], inputs: dict[str, dict[str, Any]], *, allow_local_mlflow: bool = False,
                 root: Path = REPO_ROOT) -> None:
    """Refuse, in one line, run parameters the pipeline would fail on (SubmitError); nothing is sent."""
    from ple_adatt.config import ConfigError, load_data_config, load_train_config

    unknown = sorted(set(params) - set(inputs))
    if unknown:
        raise SubmitError(f"unknown pipeline parameter {unknown[0]!r}; the pipeline takes: {', '.join(sorted(inputs))}")
    missing = [n for n, d in inputs.items() if not d.get("isOptional") and n not in params]
    if missing:
        raise SubmitError(f"pipeline parameter {missing[0]!r} is required"
                          + (": pass --data-uri s3://.../data.parquet (make submit DATA_URI=...)"
                             if missing[0] == "data_uri" else f": pass --param {missing[0]}=VALUE"))
    for name, value in params.items():
        kind = inputs[name].get("parameterType")
        if kind == "LIST" and not isinstance(value, list):
            raise SubmitError(f"pipeline parameter {name!r} is a list"
                              + ("; pass train-config overrides with --set KEY=VALUE (make submit SET='k=v ...')"
                                 if name == "overrides" else "; it cannot be set with --param"))
        if kind == "STRING" and not isinstance(value, str):
            raise SubmitError(f"pipeline parameter {name!r} must be a string, got {type(value).__name__}")

    def value(name: str) -> Any:
        return params[name] if name in params else inputs.get(name, {}).get("defaultValue")

    gx_rows = str(value("gx_rows") or "")
    if "gx_rows" in inputs and gx_rows.strip().lower() != "all" and not (gx_rows.strip().isdigit() and int(gx_rows) > 0):
        raise SubmitError(f"parameter gx_rows={gx_rows!r}: must be a positive integer or 'all'")
    data_path = image_path(str(value("data_config")), "data_config", root)
    train_path = image_path(str(value("train_config")), "train_config", root)
    overrides = list(value("overrides") or [])
    try:
        train_cfg = load_train_config(train_path, overrides, data=load_data_config(data_path))
    except ConfigError as e:
        raise SubmitError(str(e).replace(str(root) + os.sep, "")) from None
    uri = str(value("mlflow_tracking_uri") or "").strip()
    effective = uri or (train_cfg.tracking.tracking_uri or "").strip()
    _check_uri_form(effective, bool(uri), str(value("train_config")))
    if not _is_server(effective) and train_cfg.tracking.require_server:
        raise SubmitError(f"{value('train_config')} sets tracking.require_server: true, so every step would refuse "
                          f"the tracking URI {effective!r}; pass a tracking server with "
                          "PARAMS='mlflow_tracking_uri=http://<host>:<port>', or SET='tracking.require_server=false'"
                          " with --allow-local-mlflow")
    if not allow_local_mlflow and not _is_server(effective):
        where = (f"the tracking URI {effective!r}" + ("" if uri else f" (tracking.tracking_uri of {value('train_config')})")
                 if effective else "no tracking URI (the parameter mlflow_tracking_uri is empty, the images set no "
                 "$MLFLOW_TRACKING_URI), so a sqlite store")
        raise SubmitError(f"{where} is inside each step's pod: its MLflow runs and the registered model are lost "
                          "when the pod ends; pass a tracking server with PARAMS='mlflow_tracking_uri=http://<host>:<port>'"
                          " (--param mlflow_tracking_uri=...), or --allow-local-mlflow (make submit ALLOW_LOCAL_MLFLOW=1)"
                          " to run so anyway")


# ---- the conversation with the API -------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """kfp.Client prints links and logs its own retries and tracebacks to the root logger
    (``ERROR:root:Failed to get healthz info ...``): keep both off the terminal; our one line says it."""
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler(out)]  # a handler, so logging.exception() adds no stderr one
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2 and later"
            yield out
    finally:
        root.handlers, root.level = handlers, level


def probe(host: str, token: str | None, timeout_s: float = 30.0) -> dict[str, Any]:
    """One ``GET /apis/v2beta1/healthz``: the API's health, or SubmitError saying what answered instead."""
    import json

    import urllib3

    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host {host!r} is not a URL; {_HOST_HINT}")
    url = host.rstrip("/") + HEALTHZ
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = urllib3.PoolManager().request("GET", url, headers=headers, redirect=False, retries=False,
                                          timeout=urllib3.Timeout(total=timeout_s))
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise SubmitError(_explain(e, host, "check its health")) from None
    except ValueError as e:  # a malformed URL
        raise SubmitError(f"--host {host!r} is not a usable URL ({e}); {_HOST_HINT}") from None
    what = f"{r.status} {r.reason or ''}".strip()
    if r.status in (401, 403):
        sent = "the token was refused" if token else "no token was sent"
        raise SubmitError(f"the KFP API at {host} answered {what} to GET {HEALTHZ} ({sent}); {_TOKEN_HINT}")
    if 300 <= r.status < 400:
        raise SubmitError(f"{host} redirected GET {HEALTHZ} to {r.headers.get('Location', '?')} ({what}; a login "
                          f"page?): the token was not accepted or this is not the API endpoint; {_TOKEN_HINT}, or "
                          f"{_HOST_HINT}")
    ctype = r.headers.get("Content-Type", "?").split(";")[0]
    if r.status == 404:
        raise SubmitError(f"{host} does not look like a KFP v2 API: GET {HEALTHZ} answered {what}; {_HOST_HINT}")
    if r.status != 200:
        body = r.data.decode(errors="replace").strip()
        detail = body.splitlines()[0][:300] if body else ""
        raise SubmitError(f"the KFP API at {host} answered {what} to GET {HEALTHZ}" + (f": {detail}" if detail else ""))
    try:
        health = json.loads(r.data)
    except ValueError:
        health = None
    if not isinstance(health, dict):
        raise SubmitError(f"{host} does not look like a KFP API: GET {HEALTHZ} answered 200 with {ctype}, not the "
                          f"API's JSON; {_HOST_HINT}")
    return health


def _explain(e: BaseException, host: str, doing: str) -> str:
    """One line for a failed call to the KFP API."""
    import urllib3
    from kfp_server_api.exceptions import ApiException, ApiValueError

    if isinstance(e, ApiException):
        status = e.status
        if status in (401, 403):
            return f"the KFP API at {host} refused to let us {doing} ({status} {e.reason}); {_TOKEN_HINT}"
        body = (e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")).strip()
        detail = body.splitlines()[0][:300] if body else ""
        return f"the KFP API at {host} answered {status} {e.reason} when asked to {doing}" + (f": {detail}" if detail else "")
    if isinstance(e, (ApiValueError, ValueError)):  # a 200 whose body is not the API's JSON
        return f"{host} does not look like a KFP API: asked to {doing}, it answered something else ({str(e)[:150]}); {_HOST_HINT}"
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        reason = str(getattr(e, "reason", None) or e)
        reason = reason.split("Failed to establish a new connection:")[-1].strip()
        return (f"cannot reach the KFP API at {host} ({reason[:200]}); check --host / $KFP_HOST "
                "(e.g. kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80, then --host http://localhost:8080)")
    return f"{doing} failed at {host}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _need(value: Any, host: str, what: str) -> str:
    if not value:
        raise SubmitError(f"{host} does not look like a KFP API: it answered without {what}; {_HOST_HINT}")
    return str(value)


def submit(
    *,
    package: str | Path,
    host: str,
    namespace: str | None,
    token: str | None,
    experiment: str,
    run_name: str | None,
    params: dict[str, Any],
    pipeline_name: str = PIPELINE_NAME,
    version_name: str | None = None,
    description: str | None = None,
    allow_local_mlflow: bool = False,
) -> Submission:
    """Check ``params``, upload ``package`` as a new version of ``pipeline_name`` and start a run
    (SubmitError on failure; nothing is sent when a parameter is wrong)."""
    from components.images import VERSION

    pkg = Path(package)
    if not host:
        raise SubmitError("no KFP host: pass --host URL or set $KFP_HOST (make submit KFP_HOST=...)")
    check_params(params, pipeline_inputs(pkg), allow_local_mlflow=allow_local_mlflow)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    version_name = version_name or f"{VERSION}-{stamp}"
    run_name = run_name or f"{pipeline_name}-{version_name}"
    probe(host, token)
    step = "connect"
    try:
        with _quiet():
            import kfp

            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
            step = f"look up pipeline {pipeline_name!r}"
            pipeline_id = client.get_pipeline_id(pipeline_name)
            if pipeline_id is None:
                step = f"create pipeline {pipeline_name!r}"
                created = client.upload_pipeline(str(pkg), pipeline_name=pipeline_name,
                                                 description=description or f"ple-adatt {VERSION}")
                pipeline_id = _need(created.pipeline_id, host, "a pipeline id")
                step = f"list the versions of pipeline {pipeline_name!r}"
                versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
                if not versions.pipeline_versions:
                    raise SubmitError(f"the KFP API at {host} created pipeline {pipeline_id} without a version")
                version_id = _need(versions.pipeline_versions[0].pipeline_version_id, host, "a pipeline version id")
            else:
                step = f"upload version {version_name!r} of pipeline {pipeline_name!r}"
                version = client.upload_pipeline_version(str(pkg), pipeline_version_name=version_name,
                                                         pipeline_id=pipeline_id, description=description)
                version_id = _need(version.pipeline_version_id, host, "a pipeline version id")
            step = f"find or create experiment {experiment!r}"
            exp = client.create_experiment(name=experiment, namespace=namespace)
            experiment_id = _need(exp.experiment_id, host, "an experiment id")
            step = f"start run {run_name!r}"
            run = client.run_pipeline(experiment_id=experiment_id, job_name=run_name, params=params,
                                      pipeline_id=pipeline_id, version_id=version_id)
            run_id = _need(run.run_id, host, "a run id")
    except SubmitError:
        raise
    except Exception as e:  # every failure of the API conversation ends as one line
        raise SubmitError(_explain(e, host, step)) from None
    url = f"{host.rstrip('/')}/#/runs/details/{run_id}"
    return Submission(str(pipeline_id), version_id, experiment_id, run_id, url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=DEFAULT_OUT, help=f"compiled pipeline (default {DEFAULT_OUT})")
    parser.add_argument("--host", default=os.environ.get("KFP_HOST"), help="KFP API endpoint (default $KFP_HOST)")
    parser.add_argument("--namespace", default=os.environ.get("KFP_NAMESPACE"),
                        help="Kubeflow profile namespace (default $KFP_NAMESPACE)")
    parser.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default $KFP_TOKEN)")
    parser.add_argument("--experiment", default="ple-adatt", help="experiment name (default ple-adatt)")
    parser.add_argument("--run-name", help="run name (default ple-adatt-<version>-<time>)")
    parser.add_argument("--pipeline-name", default=PIPELINE_NAME, help=f"default {PIPELINE_NAME}")
    parser.add_argument("--version-name", help="pipeline version name (default <package version>-<UTC time>)")
    parser.add_argument("--data-uri", help="the dataset of the run (pipeline parameter data_uri)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="any pipeline parameter, e.g. --param mlflow_tracking_uri=http://mlflow.mlflow:5000")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train-config override (pipeline parameter overrides), repeatable")
    parser.add_argument("--allow-local-mlflow", action="store_true",
                        help="start the run even though the steps would track to a store inside their pods "
                        "(empty, sqlite or file mlflow_tracking_uri), which is lost when each pod ends")
    from ple_adatt.cli import parse_args_strictly  # stdlib only at import

    args = parse_args_strictly(parser, argv)  # a misspelt option gets "did you mean --namespace?"
    try:
        params: dict[str, Any] = parse_params(args.param)
        if args.data_uri:
            if "data_uri" in params and params["data_uri"] != args.data_uri:
                raise SubmitError(f"the dataset is given twice: --param data_uri={params['data_uri']} and --data-uri "
                                  f"{args.data_uri}; pass one (make submit DATA_URI=...)")
            params["data_uri"] = args.data_uri
        if "data_uri" not in params:
            raise SubmitError("no dataset: pass --data-uri s3://.../data.parquet (make submit DATA_URI=...)")
        if "overrides" in params:
            raise SubmitError("--param overrides=...: pass train-config overrides with --set KEY=VALUE, one each "
                              "(make submit SET='k=v ...')")
        if args.overrides:
            params["overrides"] = list(args.overrides)
        sub = submit(package=args.package, host=args.host or "", namespace=args.namespace, token=args.token,
                     experiment=args.experiment, run_name=args.run_name, params=params,
                     pipeline_name=args.pipeline_name, version_name=args.version_name,
                     allow_local_mlflow=args.allow_local_mlflow)
    except SubmitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"submitted: pipeline {sub.pipeline_id} version {sub.version_id}, experiment {sub.experiment_id}")
    print(f"run {sub.run_id}: {sub.run_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
