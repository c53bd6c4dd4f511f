from __future__ import annotations

from pathlib import Path

import pytest
from vhelpers import Env


@pytest.fixture
def env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Env:
    return Env(tmp_path, capsys)
