"""``python -m pipelines.compile``: write the pipeline IR YAML that Kubeflow Pipelines runs.

    python -m pipelines.compile --out build/ple-adatt-pipeline.yaml --registry ghcr.io/my-org

What ``make compile`` does. The components run in ``<registry>/ple-adatt-{cpu,cuda}:<version>``
(``make images`` builds them); the training steps' GPU, CPU, memory and /dev/shm requests
are flags here, the runtime inputs (dataset, configs, overrides) are run parameters.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

try:
    from .pipeline import (
        PipelineOptions,
        StepResources,
        TrainingResources,
        compile_pipeline,
        quantity_error,
    )
except KeyboardInterrupt:  # make run starts here: Ctrl-C in its first seconds lands in kfp's import
    print("compile: interrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130) from None

DEFAULT_OUT = "build/ple-adatt-pipeline.yaml"


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(
        registry=args.registry,
        training=TrainingResources(gpu=not args.no_gpu, accelerator_type=args.accelerator_type,
                                   accelerators=args.gpus, cpu=args.cpu, memory=args.memory,
                                   shm_size=args.shm_size),
        cpu_step=StepResources(cpu=args.step_cpu, memory=args.step_memory),
        retries=args.retries,
        cache_training=args.cache_training,
        cache_validate=args.cache_validate,
    )


def _quantity(kind: str) -> Any:
    """An argparse ``type``: a Kubernetes ``kind`` quantity, refused at parsing as ``argument --opt: 'x' is not ...``."""
    def check(value: str) -> str:
        why = quantity_error(kind, value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    check.__name__ = f"{kind} quantity"
    return check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, t = PipelineOptions(), TrainingResources()
    memory, cpu = _quantity("memory"), _quantity("cpu")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"IR YAML to write (default {DEFAULT_OUT})")
    parser.add_argument("--registry", help="image registry (default $PLE_ADATT_REGISTRY, else ghcr.io/ple-adatt)")
    parser.add_argument("--no-gpu", action="store_true", help="train on CPU nodes: CPU image, no accelerator request")
    parser.add_argument("--accelerator-type", default=t.accelerator_type, help=f"default {t.accelerator_type}")
    parser.add_argument("--gpus", type=int, default=t.accelerators, help="GPUs per training step (default 1)")
    parser.add_argument("--cpu", default=t.cpu, type=cpu, help=f"CPU request and limit of a training step (default {t.cpu})")
    parser.add_argument("--memory", default=t.memory, type=memory, help=f"memory of a training step (default {t.memory})")
    parser.add_argument("--shm-size", default=t.shm_size, type=_quantity("size"),
                        help=f"memory-backed /dev/shm size, a Kubernetes quantity (default {t.shm_size})")
    parser.add_argument("--step-cpu", default=d.cpu_step.cpu, type=cpu, help="CPU of validate/report/register (default 2)")
    parser.add_argument("--step-memory", default=d.cpu_step.memory, type=memory, help="memory of validate/report/register (default 8Gi)")
    parser.add_argument("--retries", type=int, default=d.retries, help="retries of a failed step (default 2)")
    parser.add_argument("--cache-training", action="store_true", help="let KFP reuse training outputs for equal inputs")
    parser.add_argument("--cache-validate", action="store_true",
                        help="let KFP reuse validate's output for equal inputs; a cache hit runs no container, so "
                        "that run's MLflow parent has no validate run")


def main(argv: list[str] | None = None) -> int:
    from ple_adatt.cli import parse_args_strictly  # stdlib only at import

    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parse_args_strictly(parser, argv)  # --no-gpus: "did you mean --no-gpu?"
    try:
        opts = options_from_args(args)
        path = compile_pipeline(args.out, opts)
    except ValueError as e:
        print(f"compile: error: {e}", file=sys.stderr)
        return 2
    from components.images import VERSION, image

    flavour = "cpu" if args.no_gpu else "cuda"
    print(f"wrote {path} (ple-adatt {VERSION}; images {image('cpu', args.registry)}, "
          f"{image(flavour, args.registry)} for training)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("compile: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
