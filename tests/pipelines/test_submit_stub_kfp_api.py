"""`make submit` against a STUB of the KFP v2beta1 REST API on 127.0.0.1 (no cluster runs here).

The stub is the only fake in the project's tests: it answers the handful of endpoints
kfp.Client uses with the shapes the real API server returns, and records each request so
the tests can check what submit sent: the upload of a new pipeline version carrying the
compiled IR, and a create-run request that references that version and the run parameters.
Two more stubs stand in for what sits in front of a cluster: an auth proxy answering 401 on
every path, and a web server answering 200 HTML. Tests that check what reaches the terminal
run submit as a subprocess: kfp logs to the root logger, which pytest's capture would hide.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import ple_adatt
from pipelines.compile import main as compile_main
from pipelines.submit import main as submit_main

TOKEN = "good-token"
ROOT = Path(__file__).resolve().parents[2]
MLFLOW = "http://mlflow.example.com:5000"  # a server URI: submit refuses a store inside the pods


class StubKfpApi(BaseHTTPRequestHandler):
    """Answers /apis/v2beta1/... like the KFP API server; 401 without the bearer TOKEN."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        state = self.server.state  # type: ignore[attr-defined]
        state["requests"].append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                  "auth": self.headers.get("Authorization"), "body": body,
                                  "content_type": self.headers.get("Content-Type", "")})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Unauthorized", "code": 16, "message": "invalid token"})
        p = url.path
        if method == "GET" and p == "/apis/v2beta1/healthz":
            return self._reply(200, {"multi_user": True})
        if method == "GET" and p == "/apis/v2beta1/pipelines":
            found = [{"pipeline_id": "pl-1", "display_name": "ple-adatt"}] if state["pipeline_exists"] else []
            return self._reply(200, {"pipelines": found, "total_size": len(found)})
        if method == "POST" and p == "/apis/v2beta1/pipelines/upload_version":
            return self._reply(200, {"pipeline_id": "pl-1", "pipeline_version_id": "ver-2",
                                     "display_name": parse_qs(url.query)["name"][0]})
        if method == "POST" and p == "/apis/v2beta1/pipelines/upload":
            state["pipeline_exists"] = True
            return self._reply(200, {"pipeline_id": "pl-1", "display_name": parse_qs(url.query)["name"][0]})
        if method == "GET" and p == "/apis/v2beta1/pipelines/pl-1/versions":
            return self._reply(200, {"pipeline_versions": [{"pipeline_id": "pl-1", "pipeline_version_id": "ver-1"}]})
        if method == "GET" and p == "/apis/v2beta1/experiments":
            return self._reply(200, {"experiments": [{"experiment_id": "exp-7", "display_name": "recsys"}]})
        if method == "POST" and p == "/apis/v2beta1/runs":
            run = json.loads(body)
            return self._reply(200, {**run, "run_id": "run-99", "state": "PENDING"})
        return self._reply(404, {"error": f"stub has no {method} {p}"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


class StubAuthProxy(StubKfpApi):
    """An auth proxy in front of the API refusing the token: 401 on every path, healthz included."""

    def _handle(self, method: str) -> None:
        self.server.state["requests"].append({"method": method, "path": urlparse(self.path).path})  # type: ignore[attr-defined]
        self._reply(401, {"error": "Unauthorized"})


class StubWebPage(StubKfpApi):
    """Not a KFP API: a web server answering 200 with an HTML page on every path."""

    def _handle(self, method: str) -> None:
        self.server.state["requests"].append({"method": method, "path": urlparse(self.path).path})  # type: ignore[attr-defined]
        data = b"<!doctype html><html><body>Welcome</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _serve(handler: type[BaseHTTPRequestHandler]):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.state = {"requests": [], "pipeline_exists": True}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def stub():
    yield from _serve(StubKfpApi)


@pytest.fixture
def auth_proxy_stub():
    yield from _serve(StubAuthProxy)


@pytest.fixture
def web_page_stub():
    yield from _serve(StubWebPage)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    assert compile_main(["--out", str(path)]) == 0
    return path


def _host(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _calls(server, method: str, path: str) -> list[dict]:
    return [r for r in server.state["requests"] if r["method"] == method and r["path"] == path]


def test_stub_submit_uploads_a_new_version_and_starts_a_run(stub, package, capsys):
    rc = submit_main(["--package", str(package), "--host", _host(stub), "--namespace", "team-recsys",
                      "--token", TOKEN, "--experiment", "recsys", "--run-name", "nightly",
                      "--data-uri", "s3://bucket/recsys.parquet", "--param", "gx_rows=all",
                      "--param", f"mlflow_tracking_uri={MLFLOW}", "--set", "training.shared_expert_epochs=3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    (upload,) = _calls(stub, "POST", "/apis/v2beta1/pipelines/upload_version")
    assert upload["query"]["pipelineid"] == ["pl-1"]
    assert upload["query"]["name"][0].startswith(f"{ple_adatt.__version__}-")
    assert upload["content_type"].startswith("multipart/form-data")
    assert b"pipelineInfo" in upload["body"] and b"ple-adatt-cuda:" + ple_adatt.__version__.encode() in upload["body"]
    assert not _calls(stub, "POST", "/apis/v2beta1/pipelines/upload")  # existing pipeline: a new version only
    (run,) = _calls(stub, "POST", "/apis/v2beta1/runs")
    sent = json.loads(run["body"])
    assert sent["display_name"] == "nightly"
    assert sent["experiment_id"] == "exp-7"
    assert sent["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "ver-2"}
    assert sent["runtime_config"]["parameters"] == {"data_uri": "s3://bucket/recsys.parquet", "gx_rows": "all",
                                                    "mlflow_tracking_uri": MLFLOW,
                                                    "overrides": ["training.shared_expert_epochs=3"]}
    (exp,) = _calls(stub, "GET", "/apis/v2beta1/experiments")
    assert exp["query"]["namespace"] == ["team-recsys"]
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in stub.state["requests"])
    assert f"{_host(stub)}/#/runs/details/run-99" in out
    assert "Pipeline details" not in out and "Run details" not in out  # kfp's own prints stay off the terminal


def test_stub_first_submit_creates_the_pipeline(stub, package, capsys):
    stub.state["pipeline_exists"] = False
    rc = submit_main(["--package", str(package), "--host", _host(stub), "--namespace", "team-recsys",
                      "--token", TOKEN, "--experiment", "recsys", "--data-uri", "s3://b/d.parquet",
                      "--param", f"mlflow_tracking_uri={MLFLOW}"])
    assert rc == 0, capsys.readouterr()
    (create,) = _calls(stub, "POST", "/apis/v2beta1/pipelines/upload")
    assert create["query"]["name"] == ["ple-adatt"]
    (run,) = _calls(stub, "POST", "/apis/v2beta1/runs")
    assert json.loads(run["body"])["pipeline_version_reference"] == {"pipeline_id": "pl-1",
                                                                     "pipeline_version_id": "ver-1"}


def test_stub_refuses_a_bad_token_with_one_line(stub, package, capsys):
    rc = submit_main(["--package", str(package), "--host", _host(stub), "--namespace", "team-recsys",
                      "--token", "expired", "--data-uri", "s3://b/d.parquet", "--param", f"mlflow_tracking_uri={MLFLOW}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "401" in err and "--token" in err and "expired" not in err
    assert not _calls(stub, "POST", "/apis/v2beta1/runs")


def test_unreachable_host_is_one_clear_line_not_a_traceback(package, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "pipelines.submit", "--package", str(package),
                           "--host", f"http://127.0.0.1:{port}", "--namespace", "ns", "--token", TOKEN,
                           "--data-uri", "s3://b/d.parquet", "--param", f"mlflow_tracking_uri={MLFLOW}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"submit: error: cannot reach the KFP API at http://127.0.0.1:{port}")
    assert "Connection refused" in lines[0] and "--host" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_submit_needs_a_host_and_a_dataset(package, capsys, monkeypatch):
    monkeypatch.delenv("KFP_HOST", raising=False)
    assert submit_main(["--package", str(package), "--data-uri", "s3://b/d"]) == 2
    assert "no KFP host" in capsys.readouterr().err
    assert submit_main(["--package", str(package), "--host", "http://127.0.0.1:1"]) == 2
    assert "--data-uri" in capsys.readouterr().err
    assert submit_main(["--package", str(package / "missing.yaml"), "--host", "http://x", "--data-uri", "s3://b"]) == 2
    assert "make compile" in capsys.readouterr().err


def _submit_subprocess(package: Path, host: str, *extra: str, env: dict[str, str] | None = None,
                       ) -> subprocess.CompletedProcess:
    """submit as its own process, so kfp's logging (the root logger) reaches the stderr checked here."""
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("KFP_HOST", "KFP_NAMESPACE", "KFP_TOKEN")}
    return subprocess.run([sys.executable, "-m", "pipelines.submit", "--package", str(package), "--host", host,
                           "--data-uri", "s3://b/d.parquet", *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**base, **(env or {})})


@pytest.mark.parametrize("namespace", [[], ["--namespace", "team-recsys"]], ids=["no-namespace", "namespace"])
def test_stub_auth_proxy_401_everywhere_is_one_line_naming_the_token(auth_proxy_stub, package, namespace):
    import time

    t0 = time.monotonic()
    proc = _submit_subprocess(package, _host(auth_proxy_stub), "--token", "expired", *namespace,
                              "--param", f"mlflow_tracking_uri={MLFLOW}")
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # kfp's "ERROR:root:Failed to get healthz info" + tracebacks stay out
    assert lines[0].startswith(f"submit: error: the KFP API at {_host(auth_proxy_stub)} answered 401")
    assert "--token" in lines[0] and "cannot reach" not in lines[0] and "expired" not in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""
    assert took < 20, f"{took:.0f}s: kfp's healthz retries (5 x 5 s) were not cut short"
    assert {r["path"] for r in auth_proxy_stub.state["requests"]} == {"/apis/v2beta1/healthz"}


def test_stub_a_web_page_is_not_a_kfp_api(web_page_stub, package):
    proc = _submit_subprocess(package, _host(web_page_stub), "--token", TOKEN,
                              "--param", f"mlflow_tracking_uri={MLFLOW}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{_host(web_page_stub)} does not look like a KFP API" in lines[0] and "text/html" in lines[0]
    assert "details/None" not in proc.stdout and "ApiValueError" not in proc.stderr
    assert not any(r["method"] == "POST" for r in web_page_stub.state["requests"])


@pytest.mark.parametrize(("args", "expected"), [
    (["--param", "foo=bar"], "unknown pipeline parameter 'foo'"),
    (["--set", "training.bogus=1"], "unknown key `training.bogus`"),
    (["--param", "train_config=configs/train/nope.yaml"], "train_config='configs/train/nope.yaml': no such file"),
    (["--param", "train_config=pyproject.toml"], "not under configs/"),
    (["--param", "data_config=configs/train/cpu_small.yaml"], "configs/train/cpu_small.yaml"),
    (["--param", "gx_rows=abc"], "gx_rows='abc': must be a positive integer or 'all'"),
    (["--param", "overrides=training.shared_expert_epochs=2"], "--set KEY=VALUE"),
], ids=["unknown-param", "unknown-override", "missing-config", "config-outside-image", "data-config-of-wrong-kind",
        "gx-rows", "overrides-as-param"])
def test_stub_bad_run_parameters_are_refused_before_any_request(stub, package, capsys, args, expected):
    rc = submit_main(["--package", str(package), "--host", _host(stub), "--token", TOKEN, "--data-uri", "s3://b/d",
                      "--param", f"mlflow_tracking_uri={MLFLOW}", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("submit: error: ") and "\n" not in err and expected in err, err
    assert stub.state["requests"] == []  # nothing uploaded, no run started


@pytest.mark.parametrize("uri", [None, "sqlite:///mlflow.db", "file:///tmp/mlruns", "mlruns"])
def test_stub_a_tracking_store_inside_the_pods_is_refused_unless_allowed(stub, package, capsys, uri):
    args = ["--package", str(package), "--host", _host(stub), "--token", TOKEN, "--namespace", "ns",
            "--data-uri", "s3://b/d"] + (["--param", f"mlflow_tracking_uri={uri}"] if uri is not None else [])
    assert submit_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "PARAMS='mlflow_tracking_uri=http://" in err and "--allow-local-mlflow" in err, err
    assert stub.state["requests"] == []
    # the default train config (production) requires a server: the opt-out alone would fail every step
    assert submit_main([*args, "--allow-local-mlflow"]) == 2
    assert "tracking.require_server" in capsys.readouterr().err and stub.state["requests"] == []
    assert submit_main([*args, "--allow-local-mlflow", "--set", "tracking.require_server=false"]) == 0, \
        capsys.readouterr()
    assert len(_calls(stub, "POST", "/apis/v2beta1/runs")) == 1


def test_a_train_config_naming_a_tracking_server_needs_no_parameter(tmp_path):
    from pipelines.pipeline import compile_pipeline
    from pipelines.submit import SubmitError, check_params, pipeline_inputs

    inputs = pipeline_inputs(compile_pipeline(str(tmp_path / "p.yaml")))
    check_params({"data_uri": "s3://b/d", "overrides": [f"tracking.tracking_uri={MLFLOW}"]}, inputs)
    with pytest.raises(SubmitError, match="tracking URI 'sqlite:///x.db' \\(tracking.tracking_uri of"):
        check_params({"data_uri": "s3://b/d", "train_config": "configs/train/cpu_small.yaml",
                      "overrides": ["tracking.tracking_uri=sqlite:///x.db"]}, inputs)
    with pytest.raises(SubmitError, match="production.yaml sets tracking.require_server: true"):
        check_params({"data_uri": "s3://b/d"}, inputs, allow_local_mlflow=True)
    check_params({"data_uri": "s3://b/d", "train_config": "/app/configs/train/cpu_small.yaml"}, inputs,
                 allow_local_mlflow=True)  # the image's absolute path of a config is this checkout's configs/


@pytest.mark.parametrize(("param", "own", "other"), [("data_config", "configs/data/", "configs/train/"),
                                                     ("train_config", "configs/train/", "configs/data/")])
def test_a_missing_config_lists_only_the_configs_of_its_kind(stub, package, capsys, param, own, other):
    """A missing data config used to list the train configs among the choices too."""
    rc = submit_main(["--package", str(package), "--host", _host(stub), "--token", TOKEN, "--data-uri", "s3://b/d",
                      "--param", f"mlflow_tracking_uri={MLFLOW}", "--param", f"{param}={own}nope.yaml"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    available = err.split("available: ", 1)[1].split(", ")
    assert available and all(a.startswith(own) for a in available), err
    assert other not in err
    assert stub.state["requests"] == []


def test_a_misspelt_option_gets_a_did_you_mean(package, capsys):
    with pytest.raises(SystemExit) as exc:
        submit_main(["--package", str(package), "--namespce", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "python -m pipelines.submit: error: unrecognized option --namespce (did you mean --namespace?)"


def test_the_dataset_given_twice_with_different_values_is_refused(stub, package, capsys):
    base = ["--package", str(package), "--host", _host(stub), "--token", TOKEN, "--namespace", "ns",
            "--param", f"mlflow_tracking_uri={MLFLOW}"]
    assert submit_main([*base, "--param", "data_uri=s3://x/y.parquet", "--data-uri", "s3://b/d.parquet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("submit: error: the dataset is given twice: --param data_uri=s3://x/y.parquet and --data-uri "
                   "s3://b/d.parquet; pass one (make submit DATA_URI=...)")
    assert stub.state["requests"] == []
    # the same value twice is no conflict: submitted with it
    assert submit_main([*base, "--param", "data_uri=s3://b/d.parquet", "--data-uri", "s3://b/d.parquet"]) == 0, \
        capsys.readouterr()
    (run,) = _calls(stub, "POST", "/apis/v2beta1/runs")
    assert json.loads(run["body"])["runtime_config"]["parameters"]["data_uri"] == "s3://b/d.parquet"


@pytest.mark.parametrize(("uri", "why"), [
    ("mlflow:5000", "it is a host and port without a scheme (did you mean http://mlflow:5000?)"),
    ("htp://mlflow:5000", "'htp' is not a scheme MLflow can track to"),
])
def test_a_malformed_tracking_uri_is_refused_as_such_even_with_allow_local_mlflow(stub, package, capsys, uri, why):
    """It used to be taken for a store inside the pods, which --allow-local-mlflow let through:
    every step would then have refused it on the cluster."""
    base = ["--package", str(package), "--host", _host(stub), "--token", TOKEN, "--data-uri", "s3://b/d",
            "--param", "train_config=configs/train/cpu_small.yaml", "--param", f"mlflow_tracking_uri={uri}"]
    for extra in ([], ["--allow-local-mlflow"], ["--allow-local-mlflow", "--set", "tracking.require_server=false"]):
        assert submit_main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"submit: error: MLflow tracking URI {uri!r} (from the pipeline "
                                                  "parameter mlflow_tracking_uri) cannot be used: "), err
        assert why in err and "inside each step's pod" not in err, err
    assert stub.state["requests"] == []


def test_a_malformed_tracking_uri_of_the_train_config_is_refused_naming_the_config(tmp_path):
    from pipelines.pipeline import compile_pipeline
    from pipelines.submit import SubmitError, check_params, pipeline_inputs

    inputs = pipeline_inputs(compile_pipeline(str(tmp_path / "p.yaml")))
    with pytest.raises(SubmitError, match=r"'localhost:5000' \(from tracking.tracking_uri of "
                                          r"configs/train/cpu_small.yaml\) cannot be used: it is a host and port"):
        check_params({"data_uri": "s3://b/d", "train_config": "configs/train/cpu_small.yaml",
                      "overrides": ["tracking.tracking_uri=localhost:5000"]}, inputs, allow_local_mlflow=True)
    # a sqlite store's directory is the pod's, not this machine's: not checked here
    check_params({"data_uri": "s3://b/d", "train_config": "configs/train/cpu_small.yaml",
                  "mlflow_tracking_uri": "sqlite:////nowhere/here/mlflow.db"}, inputs, allow_local_mlflow=True)
