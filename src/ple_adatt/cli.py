"""The ``ple-adatt`` console script: one subcommand per stage plus a few tools.

Each subcommand lives in its own module (``ple_adatt.stages.<name>`` or a tool module)
exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their subcommand runs, so ``ple-adatt --help`` stays fast. Expected failures (bad
config, bad data, bad artifact) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

DESCRIPTION = ("Train and register a PLE-Cluster + adaTT multi-task recommender: one subcommand per "
               "pipeline stage plus a few tools. Run 'ple-adatt COMMAND --help' for a command's options.")

#: subcommand -> (module, one-line help). Explicit on purpose: no discovery magic.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("ple_adatt.data.generate_cli", "write the synthetic 16-task Parquet dataset"),
    "convert-adult": ("ple_adatt.data.adult_cli", "convert the UCI Adult file into a 5-task Parquet dataset"),
    "validate": ("ple_adatt.stages.validate", "check per-task target availability (Great Expectations)"),
    "train": ("ple_adatt.stages.train", "train both phases in one process (no pipeline)"),
    "train-phase1": ("ple_adatt.stages.train_phase1", "Phase 1: train everything with task transfer"),
    "train-phase2": ("ple_adatt.stages.train_phase2", "Phase 2: freeze shared experts, fine-tune cluster heads"),
    "report": ("ple_adatt.stages.report", "write the affinity / negative-transfer report"),
    "register": ("ple_adatt.stages.register", "register the Phase 2 checkpoint in the MLflow registry"),
    "compare": ("ple_adatt.stages.compare", "train several strategies and single-task baselines; compare them"),
}


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .artifacts import ArtifactError
    from .config import ConfigError
    from .data.dataset import DataError
    from .errors import StageError

    return (ConfigError, DataError, ArtifactError, StageError, FileNotFoundError)


#: OS errors about a path the user gave: reported in one line naming the path, like FileNotFoundError
_PATH_ERRORS = (IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def _path_error(e: OSError) -> str:
    what = {
        IsADirectoryError: "is a directory; expected a file",
        NotADirectoryError: "a part of this path is a file, not a directory",
        PermissionError: "permission denied",
        FileExistsError: "already exists",
    }.get(type(e), e.strerror or str(e))
    return f"{e.filename}: {what}"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ple-adatt", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ple-adatt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def refuse_unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A misspelt option is named as such (argparse would first complain that the option it was
    meant to be is missing): a usage error, exit 2, with the closest real option."""
    import difflib

    known = [s for s in parser._option_string_actions if s.startswith("--")]
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        option = token.split("=", 1)[0]
        if any(k.startswith(option) for k in known):  # the option or an abbreviation argparse accepts
            continue
        close = difflib.get_close_matches(option, known, n=1)
        parser.error(f"unrecognized option {option}" + (f" (did you mean {close[0]}?)" if close else ""))


def parse_args_strictly(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, with a misspelt option named first (:func:`refuse_unknown_options`):
    the entry points of ``pipelines/`` parse this way, as ``ple-adatt`` does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_unknown_options(parser, argv)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / version / unknown-command error
        parser.print_help()
        return 0 if args.command is None and not argv else 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"ple-adatt {name}", description=help_text)
    module.add_arguments(sub)
    refuse_unknown_options(sub, argv[1:])
    args = sub.parse_args(argv[1:])
    previous = _catch_sigterm()
    try:
        return int(module.run(args) or 0)
    except _expected_errors() as e:
        print(f"ple-adatt {name}: error: {e}", file=sys.stderr)
        return 2
    except _PATH_ERRORS as e:  # a path argument that is a directory, a file or unreadable
        if e.filename is None:
            raise
        print(f"ple-adatt {name}: error: {_path_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ple-adatt {name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"ple-adatt {name}: terminated (SIGTERM); its partial outputs were removed", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM (``timeout``, Kubernetes stopping a pod) as an exception, so that a stage's
    temporary output directory and MLflow run are cleaned up as on Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _catch_sigterm() -> object | None:
    """Route SIGTERM to :class:`Terminated` (main thread only); returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run_as_component(argv: list[str], *, mlflow_tracking_uri: str = "", pipeline_run_id: str = "") -> None:
    """Run a stage the way a KFP component does: point tracking at the pipeline's MLflow
    server and parent run, then fail the step with the stage's exit code (the stage has
    already printed its one-line reason)."""
    import os

    from .tracking import launcher_origin, origin_env

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
        if not launcher_origin(mlflow_tracking_uri)[0]:  # make run / make stage name their own source
            # on a cluster the URI is the pipeline's parameter: errors should name that, not the variable
            os.environ.update(origin_env(mlflow_tracking_uri, "the pipeline parameter mlflow_tracking_uri",
                                         "set the pipeline's mlflow_tracking_uri parameter "
                                         "(make submit PARAMS=mlflow_tracking_uri=<uri>)"))
    if pipeline_run_id:
        os.environ["PLE_ADATT_PIPELINE_RUN_ID"] = pipeline_run_id
    rc = main(argv)
    if rc != 0:
        raise SystemExit(rc)
