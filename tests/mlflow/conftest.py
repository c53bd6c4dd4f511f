"""Fixtures of this directory live in mlhelpers.py (importable by the tests by a unique name)."""

from mlhelpers import *  # noqa: F403
from mlhelpers import _isolated_cwd, _server_process  # noqa: F401  (fixtures; * skips _names)
