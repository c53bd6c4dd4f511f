"""Compile every component to its committed ``components/<stage>/component.yaml``.

    python -m components.build          # regenerate (make components)
    python -m components.build --check  # exit 1 and name the stale files (tests, CI)

The YAML is what a user loads with ``kfp.components.load_component_from_file`` without
this repository; it must match the Python definition, so a change to a component.py
without ``make components`` fails the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from components import COMPONENTS

ROOT = Path(__file__).resolve().parent


def load(stage: str) -> Any:
    """The KFP component object of ``stage`` (ValueError listing the valid names)."""
    if stage not in COMPONENTS:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(COMPONENTS)}")
    folder = COMPONENTS[stage]
    module = importlib.import_module(f"components.{folder}.component")
    return getattr(module, folder)


def yaml_path(stage: str, root: Path = ROOT) -> Path:
    return root / COMPONENTS[stage] / "component.yaml"


def compile_text(stage: str) -> str:
    """The compiled component YAML of ``stage`` as text."""
    from kfp import compiler

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "component.yaml"
        compiler.Compiler().compile(load(stage), str(out))
        return out.read_text()


def stale(root: Path = ROOT) -> list[str]:
    """Stages whose committed component.yaml (under ``root``) differs from a fresh compile."""
    return [s for s in COMPONENTS
            if not yaml_path(s, root).exists() or yaml_path(s, root).read_text() != compile_text(s)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a YAML is out of date")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for stage in bad:
            print(f"{yaml_path(stage).relative_to(ROOT.parent)} is out of date; run `make components`")
        return 1 if bad else 0
    for stage in COMPONENTS:
        text = compile_text(stage)
        path = yaml_path(stage)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT.parent)}")
        else:
            print(f"{path.relative_to(ROOT.parent)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
