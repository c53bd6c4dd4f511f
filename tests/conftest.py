"""Test-session settings shared by every test directory.

* MLflow telemetry is off.
* Stage CLIs run untracked (``PLE_ADATT_NO_TRACKING=1``) except in ``tests/mlflow`` and
  ``tests/pipelines``, which test tracking and registration against stores they choose.
* Whatever does track without choosing a store goes to a per-session temporary sqlite store,
  never to ``./mlflow.db`` in the checkout.
* Runs a failed stage could not mark are recorded under a per-session temporary directory
  (``PLE_ADATT_STATE_DIR``), never in the user's ``~/.local/state``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def _interpret_triton_without_cuda() -> None:
    """Without a GPU, Triton kernels can only run interpreted; triton reads this on import."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_cuda()
TRACKING_DIRS = ("mlflow", "pipelines")


@pytest.fixture(scope="session")
def session_tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-default') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def session_state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ple-adatt-state")


@pytest.fixture(autouse=True)
def _tracking_defaults(request, monkeypatch, session_tracking_uri, session_state_dir):
    monkeypatch.setenv("PLE_ADATT_STATE_DIR", str(session_state_dir))
    test_dir = Path(str(request.fspath)).parent.name
    if test_dir not in TRACKING_DIRS:
        monkeypatch.setenv("PLE_ADATT_NO_TRACKING", "1")
        if "MLFLOW_TRACKING_URI" not in os.environ:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", session_tracking_uri)


CHECKOUT_STORE = Path(__file__).resolve().parents[1] / "mlflow.db"


def _store_stamp() -> tuple[int, int] | None:
    try:
        st = CHECKOUT_STORE.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def pytest_sessionstart(session):
    session.config._ple_store_stamp = _store_stamp()


def pytest_sessionfinish(session, exitstatus):
    """A test that tracked into the checkout's ./mlflow.db (a session fixture runs before the
    per-test defaults above, for one) fails the run, instead of filling the user's store."""
    if _store_stamp() != getattr(session.config, "_ple_store_stamp", None):
        print(f"\nerror: the tests wrote {CHECKOUT_STORE}: a stage ran tracked without choosing a store "
              "(pass --no-tracking, or a tracking URI under tmp_path)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only with PLE_ADATT_RUN_SLOW=1 (make test-all); ``gpu`` tests need CUDA."""
    run_slow = os.environ.get("PLE_ADATT_RUN_SLOW", "").lower() in ("1", "true", "yes")
    skip_slow = pytest.mark.skip(reason="slow on the 2-core CI machine; run with make test-all")
    cuda = False
    if any("gpu" in item.keywords for item in items):
        import torch

        cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
