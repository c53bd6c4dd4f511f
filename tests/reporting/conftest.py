"""Fixtures of this directory live in rephelpers.py (importable by the tests by a unique name)."""

from rephelpers import *  # noqa: F403
