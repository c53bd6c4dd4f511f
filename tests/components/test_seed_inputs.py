"""The per-seed inputs of the compare pipeline's components: train-phase1's ``seed`` (the same
keys ``ple-adatt compare --seeds`` sets; nothing when empty) and the compare component's grouping
of several seeds per strategy and task. The stage is replaced by a recorder: what is checked
here is the command line each component builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

import ple_adatt.cli
from components.build import load
from ple_adatt.stages.compare import seed_overrides


class _Stop(Exception):
    pass


@pytest.fixture
def recorded(monkeypatch):
    """The argv each component hands to ``run_as_component``; the stage does not run."""
    calls: list[list[str]] = []

    def fake(argv, **_kw):
        calls.append(list(argv))
        raise _Stop

    monkeypatch.setattr(ple_adatt.cli, "run_as_component", fake)
    return calls


def _phase1(tmp_path: Path, **kw) -> None:
    load("train-phase1").python_func(
        data=dsl.Dataset(uri=str(tmp_path / "data.parquet")), validation=dsl.Artifact(uri=str(tmp_path / "val")),
        checkpoint=dsl.Model(uri=str(tmp_path / "ck")), metrics=dsl.Metrics(uri=str(tmp_path / "m")),
        data_config="d.yaml", train_config="t.yaml", **kw)


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_train_phase1_without_a_seed_builds_the_command_it_built_before(tmp_path, recorded):
    with pytest.raises(_Stop):
        _phase1(tmp_path, overrides=["training.shared_expert_epochs=1"], strategy="pcgrad", only_tasks="ctr")
    assert recorded[0] == [
        "train-phase1", "--data", str(tmp_path / "data.parquet"), "--data-config", "d.yaml", "--config", "t.yaml",
        "--validation", str(tmp_path / "val"), "--out", str(tmp_path / "ck"),
        "--set", "training.shared_expert_epochs=1", "--set", "transfer.strategy=pcgrad", "--only-tasks", "ctr"]
    with pytest.raises(_Stop):
        _phase1(tmp_path, overrides=["seed=7"], seed="")  # no seed input: overrides' seed is the seed, as before
    assert _sets(recorded[1]) == ["seed=7"]


def test_train_phase1_seed_sets_the_trainer_and_task_order_seeds_as_compare_seeds_does(tmp_path, recorded):
    with pytest.raises(_Stop):
        _phase1(tmp_path, overrides=["training.shared_expert_epochs=1"], strategy="mocograd", seed="3")
    assert _sets(recorded[0]) == ["training.shared_expert_epochs=1", "transfer.strategy=mocograd",
                                  "seed=3", "transfer.pcgrad.seed=3", "transfer.mocograd.seed=3"]
    assert _sets(recorded[0])[2:] == seed_overrides(3)  # one definition for the CLI and the pipeline


@pytest.mark.parametrize(("seed", "overrides", "message"), [
    ("x", [], "train-phase1: error: input seed 'x': expected an integer"),
    ("1", ["seed=7"], "train-phase1: error: overrides ['seed=7'] set what the seed input (1) sets"),
    ("1", [" transfer.pcgrad.seed = 2"], "overrides [' transfer.pcgrad.seed = 2'] set what the seed input (1)"),
])
def test_train_phase1_refuses_a_bad_seed_or_a_seed_also_in_overrides_in_one_line(tmp_path, recorded, capsys, seed,
                                                                                  overrides, message):
    with pytest.raises(SystemExit) as exc:
        _phase1(tmp_path, overrides=overrides, seed=seed)
    assert exc.value.code == 2 and not recorded
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _checkpoint(root: Path, name: str, strategy: str, tasks: list[str], seed: int) -> dsl.Model:
    path = root / name
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"strategy": strategy, "tasks": tasks,
                                                    "train_config": {"seed": seed}}))
    return dsl.Model(uri=str(path))


def _compare(tmp_path: Path, checkpoints, singles) -> None:
    out = tmp_path / "compare"
    load("compare").python_func(checkpoints=checkpoints, singles=singles,
                                comparison=dsl.Artifact(uri=str(out / "comparison")),
                                comparison_html=dsl.HTML(uri=str(out / "html")),
                                comparison_md=dsl.Markdown(uri=str(out / "md")))


def test_compare_component_passes_each_seed_as_a_run_and_groups_single_tasks_by_seed(tmp_path, recorded):
    joint = [_checkpoint(tmp_path, f"j{i}", s, ["ctr", "cvr"], seed)
             for i, (s, seed) in enumerate([("adatt", 0), ("pcgrad", 0), ("adatt", 1), ("pcgrad", 1)])]
    singles = [_checkpoint(tmp_path, "s0", "equal", ["ctr"], 1), _checkpoint(tmp_path, "s1", "equal", ["cvr"], 0),
               _checkpoint(tmp_path, "s2", "equal", ["ctr"], 0), _checkpoint(tmp_path, "s3", "equal", ["cvr"], 1)]
    with pytest.raises(_Stop):
        _compare(tmp_path, joint, singles)
    argv = recorded[0]
    runs = [argv[i + 1] for i, a in enumerate(argv) if a == "--runs"]
    assert runs == [f"adatt={joint[0].path}", f"pcgrad={joint[1].path}",
                    f"adatt={joint[2].path}", f"pcgrad={joint[3].path}"]
    root = Path(argv[argv.index("--singles") + 1])
    layout = {str(p.relative_to(root)): str(p.resolve()) for p in root.glob("*/*") if p.name.startswith("seed-")}
    assert layout == {"ctr/seed-0": singles[2].path, "ctr/seed-1": singles[0].path,
                      "cvr/seed-0": singles[1].path, "cvr/seed-1": singles[3].path}


def test_compare_component_links_one_seed_per_task_by_task_name_as_before(tmp_path, recorded):
    joint = [_checkpoint(tmp_path, "j", "adatt", ["ctr"], 5)]
    singles = [_checkpoint(tmp_path, "s", "equal", ["ctr"], 5)]
    with pytest.raises(_Stop):
        _compare(tmp_path, joint, singles)
    root = Path(recorded[0][recorded[0].index("--singles") + 1])
    assert [p.name for p in root.iterdir()] == ["ctr"]
    assert (root / "ctr").is_symlink() and str((root / "ctr").resolve()) == singles[0].path


def test_compare_component_refuses_two_single_task_checkpoints_of_one_task_and_seed(tmp_path, recorded, capsys):
    joint = [_checkpoint(tmp_path, "j", "adatt", ["ctr"], 0)]
    singles = [_checkpoint(tmp_path, "a", "equal", ["ctr"], 0), _checkpoint(tmp_path, "b", "equal", ["ctr"], 0)]
    with pytest.raises(SystemExit) as exc:
        _compare(tmp_path, joint, singles)
    assert exc.value.code == 2 and not recorded
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare: error: two single-task checkpoints of 'ctr' with seed 0") and "\n" not in err
