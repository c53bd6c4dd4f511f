"""``ple-adatt register``: register the Phase 2 checkpoint in the MLflow model registry.

    ple-adatt register --checkpoint runs/train/phase2 --validation runs/validate \\
        --report runs/report --out runs/register

Logs the checkpoint (with its adaTT buffers), the validation result and the report as a
new version of the registered model ``registry.model_name``, tags it with its lineage, gives
it the ``candidate`` alias and moves ``champion`` to it when the champion gate holds.
Writes ``OUT/registration.json`` (model name, version, aliases, decision and reason,
lineage) and ``OUT/manifest.json`` atomically: OUT exists only after a successful run.
Registering the same checkpoint again returns the existing version; a checkpoint whose task set
differs from the registered model's versions is refused (it needs its own ``registry.model_name``).

With ``--no-tracking`` (default on when ``$PLE_ADATT_NO_TRACKING`` is 1, as for every stage)
nothing is registered: registering needs MLflow. The inputs are still checked, and
``registration.json`` says ``"registered": false`` and why.

The registry settings come from the checkpoint's own train config unless ``--config`` is
given; ``--set registry.tolerance=0.02`` overrides a key. Register reads only the
``registry.*`` and ``tracking.*`` keys: a ``--set`` of another key is refused unless it
restates the value the checkpoint was trained with (a pipeline passes its training overrides
to every step). The tracking server is
``$MLFLOW_TRACKING_URI`` (else ``tracking.tracking_uri``, else the local ``mlflow.db``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .common import NO_TRACKING_ENV, add_set_argument, no_tracking_env

KIND = "registration"
SCHEMA_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Phase 2 checkpoint directory")
    parser.add_argument("--validation", required=True, help="output directory of `ple-adatt validate`")
    parser.add_argument("--report", help="output directory of `ple-adatt report` (optional)")
    parser.add_argument("--out", required=True, help="directory for registration.json (replaced atomically)")
    parser.add_argument("--config", help="train config YAML for the registry/tracking settings "
                        "(default: the checkpoint's own train config)")
    parser.add_argument("--alias", dest="aliases", action="append", default=[], metavar="NAME",
                        help="an extra alias for the new version, e.g. --alias staging (repeatable)")
    add_set_argument(parser, example="registry.tolerance=0.02")
    parser.add_argument(
        "--pipeline-run-id", default=os.environ.get("PLE_ADATT_PIPELINE_RUN_ID"),
        help="id of the pipeline run (its MLflow parent run); default $PLE_ADATT_PIPELINE_RUN_ID",
    )
    parser.add_argument(
        "--no-tracking", action="store_true", default=no_tracking_env(),
        help="skip MLflow, so register nothing: check the inputs and write registration.json saying so "
        f"(default on when ${NO_TRACKING_ENV} is 1)",
    )


#: the train-config sections register reads; a --set elsewhere would change nothing it does
USED_SECTIONS = ("registry", "tracking")


def refuse_ignored_overrides(trained: dict[str, Any], overrides: list[str] | None, where: str) -> None:
    """ConfigError, in one line, for ``--set`` keys outside ``registry.*`` / ``tracking.*`` that
    change the train config ``trained`` (the checkpoint's): register would ignore them and only
    record them. Ones that restate the trained values are accepted: a pipeline passes its training
    overrides to every step, register included, and they are in the checkpoint's config (taken
    together and in order, as a ``make stage`` chain lists a key again with its new value)."""
    from ..config import ConfigError, apply_overrides, to_dict, train_config_from_dict

    others = [item for item in overrides or [] if item.split("=", 1)[0].strip().split(".")[0] not in USED_SECTIONS]
    if not others:
        return
    base = to_dict(train_config_from_dict(trained, where))
    final = to_dict(train_config_from_dict(apply_overrides(trained, others, "--set"), f"{where} + --set"))
    if final == base:
        return

    def at(d: Any, key: str) -> Any:
        for k in key.split("."):
            d = d.get(k, "unset") if isinstance(d, dict) else "unset"
        return d

    key, item = next(((k, i) for i in reversed(others) if at(final, k := i.split("=", 1)[0].strip())
                      != at(base, k)), (others[0].split("=", 1)[0].strip(), others[0]))
    raise ConfigError(
        f"--set {item!r}: register uses only the registry.* and tracking.* keys of the train config, so this "
        f"would be ignored (the checkpoint was trained with {key}={at(base, key)!r}); pass registry.* or "
        f"tracking.* keys only, or retrain with it (make stage STAGE=train-phase2 SET='{item}')")


def _train_config(checkpoint: Path, config: str | Path | None, overrides: list[str] | None) -> Any:
    """The config whose ``registry`` and ``tracking`` sections apply."""
    import json

    from ..config import apply_overrides, load_train_config, train_config_from_dict

    man_path = checkpoint / "manifest.json"
    try:
        raw = json.loads(man_path.read_text())["train_config"]
    except (OSError, ValueError, KeyError, TypeError):  # the checkpoint check names the problem later
        raw = {}
    if raw and isinstance(raw, dict):
        refuse_ignored_overrides(raw, overrides, f"{man_path} train_config")
    if config is not None:
        return load_train_config(config, overrides, data_option=None)
    return train_config_from_dict(apply_overrides(raw, overrides, "--set"), f"{man_path} + --set")


def register_model(
    *,
    checkpoint: str | Path,
    validation: str | Path,
    out: str | Path,
    report: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    pipeline_run_id: str | None = None,
    aliases: list[str] | None = None,
    no_tracking: bool = False,
) -> dict[str, Any]:
    """Register ``checkpoint`` (Phase 2) and write ``out``; returns the registration record.

    ``no_tracking``: register nothing (registering needs MLflow); check the inputs and write
    a record with ``"registered": false`` and the reason.

    Raises ArtifactError for a checkpoint without its manifest or adaTT buffers, a diverged
    checkpoint (non-finite weights, NaN or missing validation metrics), a Phase 1 checkpoint or
    mismatched inputs, RegistryError for registry settings MLflow would refuse, and
    TrackingError when the registry cannot be reached; in all cases nothing is registered
    (a failure after the version was created undoes it) and ``out`` is not written.
    """
    from ..artifacts import atomic_output_dir, check_output_dir, make_manifest, write_json
    from ..config import config_hash
    from ..registry import (
        check_inputs,
        check_registry_settings,
        register_checkpoint,
        registration_inputs_sha,
    )
    from ..tracking import stage_run

    checkpoint, validation = Path(checkpoint), Path(validation)
    # before the registry is touched: a bad --out must not undo a version
    out = check_output_dir(out, kind=KIND, inputs=(checkpoint, validation, report, config))
    train_cfg = _train_config(checkpoint, config, overrides)
    inputs = check_inputs(checkpoint, validation, report)  # refuse before touching the registry
    check_registry_settings(train_cfg.registry, aliases or [])  # aliases, names, tolerance: before logging
    if no_tracking:
        return _skip(out, inputs, train_cfg, pipeline_run_id)
    args = argparse.Namespace(checkpoint=str(checkpoint), validation=str(validation),
                              report=None if report is None else str(report), out=str(out),
                              config=None if config is None else str(config), overrides=list(overrides or []),
                              pipeline_run_id=pipeline_run_id, no_tracking=False)
    with stage_run("register", args, train_config=train_cfg) as tracker:
        tracker.log_artifact(validation, "validation")
        if inputs.report is not None:
            for f in inputs.report_files:
                tracker.log_artifact(inputs.report / f, "report")

        def write_out(record: dict[str, Any]) -> None:
            """The outputs; if this fails, register_checkpoint undoes the registration."""
            tracker.set_tags({"registered_model": record["model_name"], "registered_version": record["version"],
                              "champion_decision": record["decision"]})
            record["pipeline_run_id"] = args.pipeline_run_id
            with atomic_output_dir(out) as tmp:
                write_json(tmp / "registration.json", record)
                write_json(tmp / "manifest.json", make_manifest(
                    KIND, "register", schema_version=SCHEMA_VERSION, config_hash=config_hash(train_cfg),
                    inputs=registration_inputs_sha(inputs),
                    extra={"files": ["registration.json"], "model_uri": record["model_uri"]},
                ))
                tracker.log_artifact(tmp / "registration.json", "registration")  # before OUT appears

        record = register_checkpoint(inputs, registry=train_cfg.registry, tracker=tracker,
                                     pipeline_run_id=args.pipeline_run_id, extra_aliases=aliases or [],
                                     on_registered=write_out)
    return record


SKIPPED = (f"tracking is off (--no-tracking or {NO_TRACKING_ENV}=1) and registering needs MLflow; "
           f"unset {NO_TRACKING_ENV} to register")


def _skip(out: Path, inputs: Any, train_cfg: Any, pipeline_run_id: str | None) -> dict[str, Any]:
    """The outputs of a register step run without MLflow: nothing registered, and why."""
    from ..artifacts import atomic_output_dir, make_manifest, write_json
    from ..config import config_hash
    from ..registry import registration_inputs_sha

    record = {"registered": False, "skipped": SKIPPED, "model_name": train_cfg.registry.model_name,
              "version": None, "model_uri": None, "aliases": [], "decision": "skipped", "reason": SKIPPED,
              "created": False, "pipeline_run_id": pipeline_run_id,
              "checkpoint_sha256": inputs.checkpoint_sha256}
    with atomic_output_dir(out) as tmp:
        write_json(tmp / "registration.json", record)
        write_json(tmp / "manifest.json", make_manifest(
            KIND, "register", schema_version=SCHEMA_VERSION, config_hash=config_hash(train_cfg),
            inputs=registration_inputs_sha(inputs), extra={"files": ["registration.json"], "model_uri": None},
        ))
    return record


def run(args: argparse.Namespace) -> int:
    rec = register_model(checkpoint=args.checkpoint, validation=args.validation, out=args.out, report=args.report,
                         config=args.config, overrides=args.overrides, pipeline_run_id=args.pipeline_run_id,
                         aliases=args.aliases, no_tracking=args.no_tracking)
    if not rec["registered"]:
        print(f"nothing registered: {rec['skipped']}  -> {args.out}/registration.json")
        return 0
    state = "registered" if rec["created"] else "already registered (same checkpoint) as"
    print(f"{state} {rec['model_name']} v{rec['version']} (aliases: {', '.join(rec['aliases']) or 'none'})")
    print(f"champion gate: {rec['decision']}: {rec['reason']}")
    # the new version holds the candidate alias; a reused one may not (a newer version may)
    uri = (f"models:/{rec['model_name']}@{rec['candidate_alias']}" if rec["created"]
           else f"models:/{rec['model_name']}/{rec['version']}")
    print(f"load it with: ple_adatt.registry.load_registered_model({uri!r}, tracking_uri={rec['tracking_uri']!r})"
          f"  -> {args.out}/registration.json")
    return 0
