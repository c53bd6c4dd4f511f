"""``python -m pipelines.submit``: upload the compiled pipeline as a new version and start a run.

    python -m pipelines.submit --host https://kfp.example.com --namespace team-recsys --token "$KFP_TOKEN" \\
        --experiment ple-adatt --data-uri s3://bucket/datasets/recsys.parquet \\
        --param mlflow_tracking_uri=http://mlflow.mlflow:5000 --set training.shared_expert_epochs=10

What ``make submit`` does, through ``kfp.Client``: the pipeline ``ple-adatt`` is created on
the first upload, later uploads add a version named ``<package version>-<UTC time>``; the
run starts in the experiment (created if missing) and its URL is printed. Host, namespace
and token also come from ``$KFP_HOST``, ``$KFP_NAMESPACE`` and ``$KFP_TOKEN``. An
unreachable host, a refused token or a rejected request end with one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .compile import DEFAULT_OUT
from .pipeline import PIPELINE_NAME


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


def _explain(e: BaseException, host: str, doing: str) -> str:
    """One line for a failed call to the KFP API."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    if isinstance(e, ApiException):
        status = e.status
        if status in (401, 403):
            return (f"the KFP API at {host} refused to let us {doing} ({status} {e.reason}); pass a valid token "
                    "with --token or $KFP_TOKEN (and your profile namespace with --namespace)")
        body = (e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")).strip()
        detail = body.splitlines()[0][:300] if body else ""
        return f"the KFP API at {host} answered {status} {e.reason} when asked to {doing}" + (f": {detail}" if detail else "")
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        reason = str(getattr(e, "reason", None) or e)
        reason = reason.split("Failed to establish a new connection:")[-1].strip()
        return (f"cannot reach the KFP API at {host} ({reason[:200]}); check --host / $KFP_HOST "
                "(e.g. kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80, then --host http://localhost:8080)")
    return f"{doing} failed at {host}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


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
) -> Submission:
    """Upload ``package`` as a new version of ``pipeline_name`` and start a run (SubmitError on failure)."""
    import kfp

    from components.images import VERSION

    pkg = Path(package)
    if not pkg.exists():
        raise SubmitError(f"{pkg}: no compiled pipeline; run `make compile` first")
    if not host:
        raise SubmitError("no KFP host: pass --host URL or set $KFP_HOST (make submit KFP_HOST=...)")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    version_name = version_name or f"{VERSION}-{stamp}"
    run_name = run_name or f"{pipeline_name}-{version_name}"
    step = "connect"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2 and later"
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
        step = f"look up pipeline {pipeline_name!r}"
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            step = f"create pipeline {pipeline_name!r}"
            created = client.upload_pipeline(str(pkg), pipeline_name=pipeline_name,
                                             description=description or f"ple-adatt {VERSION}")
            pipeline_id = created.pipeline_id
            step = f"list the versions of pipeline {pipeline_name!r}"
            versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
            if not versions.pipeline_versions:
                raise SubmitError(f"the KFP API at {host} created pipeline {pipeline_id} without a version")
            version_id = versions.pipeline_versions[0].pipeline_version_id
        else:
            step = f"upload version {version_name!r} of pipeline {pipeline_name!r}"
            version = client.upload_pipeline_version(str(pkg), pipeline_version_name=version_name,
                                                     pipeline_id=pipeline_id, description=description)
            version_id = version.pipeline_version_id
        step = f"find or create experiment {experiment!r}"
        exp = client.create_experiment(name=experiment, namespace=namespace)
        step = f"start run {run_name!r}"
        run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name, params=params,
                                  pipeline_id=pipeline_id, version_id=version_id)
    except SubmitError:
        raise
    except Exception as e:  # every failure of the API conversation ends as one line
        raise SubmitError(_explain(e, host, step)) from None
    url = f"{host.rstrip('/')}/#/runs/details/{run.run_id}"
    return Submission(pipeline_id, version_id, exp.experiment_id, run.run_id, url)


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
                        help="any pipeline parameter, e.g. --param train_config=configs/train/production.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train-config override (pipeline parameter overrides), repeatable")
    args = parser.parse_args(argv)
    try:
        params: dict[str, Any] = parse_params(args.param)
        if args.data_uri:
            params["data_uri"] = args.data_uri
        if "data_uri" not in params:
            raise SubmitError("no dataset: pass --data-uri s3://.../data.parquet (make submit DATA_URI=...)")
        if args.overrides:
            params["overrides"] = list(args.overrides)
        sub = submit(package=args.package, host=args.host or "", namespace=args.namespace, token=args.token,
                     experiment=args.experiment, run_name=args.run_name, params=params,
                     pipeline_name=args.pipeline_name, version_name=args.version_name)
    except SubmitError as e:
        print(f"make submit: error: {e}", file=sys.stderr)
        return 2
    print(f"submitted: pipeline {sub.pipeline_id} version {sub.version_id}, experiment {sub.experiment_id}")
    print(f"run {sub.run_id}: {sub.run_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
