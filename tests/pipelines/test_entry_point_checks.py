"""The pipelines/* command lines refuse bad arguments at parsing, in one line that names the
option and the value: misspelt options (did you mean), Kubernetes quantities, unknown tasks."""

from __future__ import annotations

import pytest

from pipelines.compare_pipeline import build_compare_pipeline
from pipelines.compare_pipeline import main as compare_main
from pipelines.compile import main as compile_main
from pipelines.local import main as local_main
from pipelines.pipeline import StepResources, TrainingResources
from pipelines.stage import main as stage_main


def _usage_error(capsys, fn, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("fn", "prog", "typo", "meant"), [
    (compile_main, "compile", "--no-gpus", "--no-gpu"),
    (compare_main, "compare_pipeline", "--strategy", "--strategies"),
    (local_main, "local", "--train-confg", "--train-config"),
    (stage_main, "stage", "--rnu", "--run"),
], ids=["compile", "compare", "local", "stage"])
def test_a_misspelt_option_gets_a_did_you_mean(tmp_path, capsys, fn, prog, typo, meant):
    argv = ([] if fn is not stage_main else ["validate"]) + [typo, "x", "--out", str(tmp_path / "o.yaml")]
    err = _usage_error(capsys, fn, argv)
    assert err == f"python -m pipelines.{prog}: error: unrecognized option {typo} (did you mean {meant}?)"
    assert not (tmp_path / "o.yaml").exists()


@pytest.mark.parametrize(("option", "value", "what", "hint"), [
    ("--shm-size", "banana", "a Kubernetes quantity", "e.g. 8Gi"),
    ("--shm-size", "16GB", "a Kubernetes quantity", "did you mean 16G?"),  # 16e9 bytes, as written
    ("--shm-size", "0", "a Kubernetes quantity", "e.g. 8Gi"),
    ("--memory", "64GB", "a memory quantity kfp accepts", "did you mean 64G?"),
    ("--memory", "1.5Gi", "a memory quantity kfp accepts", "e.g. 16Gi"),  # Kubernetes' grammar, not kfp's
    ("--memory", "512k", "a memory quantity kfp accepts", "did you mean 512000?"),
    ("--step-memory", "16GB", "a memory quantity kfp accepts", "did you mean 16G?"),
    ("--step-memory", "8 gib", "a memory quantity kfp accepts", "did you mean 8Gi?"),
    ("--cpu", "eight", "a Kubernetes CPU quantity", "e.g. 8, 0.5 or 500m"),
    ("--step-cpu", "2 cores", "a Kubernetes CPU quantity", "e.g. 8, 0.5 or 500m"),
    ("--cpu", "0m", "a Kubernetes CPU quantity", "e.g. 8, 0.5 or 500m"),
])
def test_compile_refuses_a_bad_quantity_naming_the_option_and_value(tmp_path, capsys, option, value, what, hint):
    out = tmp_path / "c.yaml"
    err = _usage_error(capsys, compile_main, ["--out", str(out), option, value])
    assert err.startswith(f"python -m pipelines.compile: error: argument {option}: {value!r} is not {what}"), err
    assert hint in err, err
    assert not out.exists()


@pytest.mark.parametrize(("option", "value"), [("--shm-size", "16Gi"), ("--memory", "64G"), ("--step-memory", "512Mi"),
                                               ("--cpu", "0.5"), ("--step-cpu", "500m"), ("--shm-size", "1Ti"),
                                               # the emptyDir's size goes to Kubernetes as written: its grammar
                                               ("--shm-size", "1.5Gi"), ("--shm-size", "512k"), ("--shm-size", "1e9")])
def test_compile_takes_valid_kubernetes_quantities(tmp_path, option, value):
    out = tmp_path / "c.yaml"
    assert compile_main(["--out", str(out), option, value]) == 0
    assert value in out.read_text()


def test_resources_built_in_python_are_checked_too():
    with pytest.raises(ValueError, match=r"shm_size '16GB' is not a Kubernetes quantity.*did you mean 16G\?"):
        TrainingResources(shm_size="16GB")
    with pytest.raises(ValueError, match=r"memory '8gb' is not a memory quantity kfp accepts"):
        StepResources(cpu="2", memory="8gb")
    with pytest.raises(ValueError, match=r"cpu_limit 'x' is not a Kubernetes CPU quantity"):
        StepResources(cpu="2", memory="8Gi", cpu_limit="x")


def test_compare_pipeline_refuses_unknown_single_tasks_with_the_valid_names(tmp_path, capsys):
    out = tmp_path / "cmp.yaml"
    assert compare_main(["--out", str(out), "--single-tasks", "ctr,crv"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("compare_pipeline: error: --single-tasks: unknown task 'crv' (did you mean 'cvr'?) "
                          "in configs/data/synthetic.yaml; tasks: ctr, cvr, "), err
    assert not out.exists()
    # checked against --data-config, the source of the default baselines
    assert compare_main(["--out", str(out), "--single-tasks", "ctr", "--data-config", "configs/data/adult.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'ctr'" in err and "configs/data/adult.yaml" in err and not out.exists()
    assert compare_main(["--out", str(out), "--single-tasks", "ctr,ctr"]) == 2
    assert "--single-tasks: 'ctr' is named twice" in capsys.readouterr().err and not out.exists()
    assert compare_main(["--out", str(out), "--strategies", "adatt", "--single-tasks", "ctr,cvr"]) == 0
    with pytest.raises(ValueError, match="unknown task 'crv'"):
        build_compare_pipeline(["adatt"], single_tasks=["crv"])
