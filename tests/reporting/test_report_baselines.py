"""Single-task baselines are only used for TCI when their losses are comparable with the joint run's.

Real single-task checkpoints (``train-phase1 --only-tasks ctr``, one epoch) on the session run's
data: one with the joint run's focal loss, one with BCE (as `compare` with compare_tiny.yaml
would train it). The BCE one is refused in every form; a baselines JSON that records nothing
checkable is used with a visible warning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rephelpers import ROOT, THRESHOLD, Run

from ple_adatt.artifacts import ArtifactError
from ple_adatt.reporting.inputs import loss_provenance
from ple_adatt.stages.report import build_report


def _single(run: Run, out: Path, *extra: str) -> Path:
    """A real single-task (ctr) Phase 1 checkpoint: the session run's config, one epoch."""
    assert run.cli(
        "train-phase1", "--data", run.data, "--data-config", ROOT / "configs/data/synthetic.yaml",
        "--config", ROOT / "configs/train/cpu_small.yaml", "--validation", run.validation, "--out", out,
        "--only-tasks", "ctr", "--no-tracking", "--set", "transfer.strategy=equal",
        "--set", "training.shared_expert_epochs=1", "--set", "training.cluster_finetune_epochs=1",
        "--set", "training.early_stopping_patience=10",
        "--set", f"transfer.adatt.negative_transfer_threshold={THRESHOLD}", *extra,
    ) == 0
    return out


@pytest.fixture(scope="session")
def singles(run: Run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("singles")
    return {
        "focal": _single(run, root / "focal" / "ctr"),
        "bce": _single(run, root / "bce" / "ctr", "--set", "tasks.ctr.loss=bce"),
    }


def _report(run: Run, out: Path, baselines: Path) -> dict:
    build_report(phase1=run.phase1, phase2=run.phase2, validation=run.validation, out=out, baselines=baselines)
    return json.loads((out / "report.json").read_text())


def _refused(run: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path, baselines: Path) -> str:
    capsys.readouterr()
    assert run.cli("report", "--no-tracking", "--phase1", run.phase1, "--phase2", run.phase2,
                   "--validation", run.validation, "--out", tmp_path / "out", "--baselines", baselines) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_a_baseline_with_another_loss_is_refused(run: Run, singles: dict[str, Path], capsys,
                                                 tmp_path: Path) -> None:
    """The directory form: the single-task checkpoint's manifest says BCE, the joint run focal."""
    err = _refused(run, capsys, tmp_path, singles["bce"].parent)
    assert f"--baselines {singles['bce']}: task 'ctr' is not comparable with --phase1 {run.phase1}" in err
    assert "`loss` (the loss) is 'bce' in the baseline, 'focal' in the joint run" in err


def test_an_old_compare_baselines_json_is_checked_against_its_checkpoints(
        run: Run, singles: dict[str, Path], capsys, tmp_path: Path) -> None:
    """baselines.json as compare writes it today (no provenance) is checked through the
    single_task/<task>/<phase> checkpoints beside it whose loss it holds."""
    cmp = tmp_path / "compare"
    shutil.copytree(singles["bce"], cmp / "single_task" / "ctr" / "phase1")
    loss = json.loads((singles["bce"] / "manifest.json").read_text())["metrics"]["tasks"]["ctr"]["loss"]
    (cmp / "baselines.json").write_text(json.dumps({"kind": "single_task_baselines", "phase": "phase1",
                                                    "val_loss": {"ctr": loss}}))
    for given in (cmp, cmp / "baselines.json"):
        err = _refused(run, capsys, tmp_path, given)
        assert "task 'ctr' is not comparable" in err and "'bce' in the baseline, 'focal'" in err


def test_recorded_provenance_in_a_json_is_checked(run: Run, singles: dict[str, Path], capsys,
                                                  tmp_path: Path) -> None:
    man = json.loads((singles["focal"] / "manifest.json").read_text())
    prov = loss_provenance(man, "ctr")
    assert prov["loss"] == "focal" and prov["alpha"] == 0.25 and len(prov["data_hash"]) == 64
    prov["data_hash"] = "1" * 64
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"kind": "single_task_baselines", "phase": "phase1", "val_loss": {"ctr": 0.1},
                                "provenance": {"ctr": prov}}))
    err = _refused(run, capsys, tmp_path, base)
    assert "`data_hash` (the data hash) is 111111111111 in the baseline, " in err
    # same loss name, another parameter: named with the loss it belongs to
    prov = {**loss_provenance(man, "ctr"), "gamma": 0.0}
    base.write_text(json.dumps({"kind": "single_task_baselines", "phase": "phase1", "val_loss": {"ctr": 0.1},
                                "provenance": {"ctr": prov}}))
    assert "`gamma` (the focal loss parameter gamma) is 0.0 in the baseline, 2.0 in the joint run" in \
        _refused(run, capsys, tmp_path, base)


def test_a_comparable_baseline_is_used_and_says_what_was_checked(run: Run, singles: dict[str, Path],
                                                                tmp_path: Path) -> None:
    rep = _report(run, tmp_path / "r", singles["focal"].parent)
    (row,) = rep["tci"]["tasks"]
    m1 = json.loads((run.phase1 / "manifest.json").read_text())
    alone = json.loads((singles["focal"] / "manifest.json").read_text())["metrics"]["tasks"]["ctr"]["loss"]
    assert row["phase"] == "phase1" and row["alone_loss"] == pytest.approx(alone)
    assert row["joint_loss"] == pytest.approx(m1["metrics"]["tasks"]["ctr"]["loss"])
    checked = rep["tci"]["checked"]["phase1"]["ctr"]
    assert {"data_hash", "split", "max_rows", "target", "loss", "alpha", "gamma"} <= set(checked)
    # trained for 1 epoch against the joint run's 4: comparable, but said
    (w,) = [w for w in rep["warnings"] if "trained differently" in w]
    assert "training.shared_expert_epochs 1 vs 4 (ctr)" in w
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Checked equal to the joint run for 1 of 1 baseline(s): alpha, data_hash" in html
    assert "training.shared_expert_epochs 1 vs 4" in html


def test_a_json_without_provenance_is_used_with_a_visible_warning(run: Run, tmp_path: Path) -> None:
    base = tmp_path / "hand.json"
    base.write_text(json.dumps({"kind": "single_task_baselines", "phase": "phase2", "val_loss": {"cvr": 0.05}}))
    rep = _report(run, tmp_path / "r", base)
    assert rep["tci"]["tasks"][0]["tci"] is not None and rep["tci"]["checked"] == {}
    (w,) = [w for w in rep["warnings"] if "record no provenance" in w]
    assert str(base) in w and "for cvr" in w and w in rep["tci"]["warnings"]
    assert "record no provenance" in (tmp_path / "r" / "report.html").read_text()
    assert "> note: baselines " in (tmp_path / "r" / "report.md").read_text()


def test_load_baselines_without_a_joint_run_checks_nothing(singles: dict[str, Path]) -> None:
    """`compare` reads its own baselines without a joint run: nothing to check against."""
    from ple_adatt.reporting.inputs import load_baselines

    b = load_baselines(singles["bce"].parent, ["ctr", "cvr"])
    assert set(b.val_loss["phase1"]) == {"ctr"} and b.checked == {} and b.warnings == []
    with pytest.raises(ArtifactError, match="not comparable"):
        load_baselines(singles["bce"].parent, ["ctr"],
                       joint={"phase1": (singles["focal"], json.loads((singles["focal"] / "manifest.json")
                                                                      .read_text()))})


def _as_seed(src: Path, dst: Path, seed: int, scale: float = 1.0) -> float:
    """A copy of a single-task checkpoint as seed ``seed`` of a several-seed compare's
    ``single_task/ctr/seed-<n>/phase1``, its loss scaled; returns that loss."""
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    man["train_config"]["seed"] = seed
    man["metrics"]["tasks"]["ctr"]["loss"] *= scale
    (dst / "manifest.json").write_text(json.dumps(man))
    return man["metrics"]["tasks"]["ctr"]["loss"]


def test_a_several_seed_compare_single_task_dir_is_the_mean_over_seeds(run: Run, singles: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """`--baselines OUT/single_task` of `compare --seeds`: <task>/seed-<n>/<phase> (was refused
    as holding no checkpoint): the mean loss over the seeds, each seed checked."""
    st = tmp_path / "single_task"
    losses = [_as_seed(singles["focal"], st / "ctr" / f"seed-{s}" / "phase1", s, k)
              for s, k in ((0, 1.0), (3, 1.5))]
    rep = _report(run, tmp_path / "r", st)
    (row,) = rep["tci"]["tasks"]
    assert row["phase"] == "phase1" and row["alone_loss"] == pytest.approx((losses[0] + losses[1]) / 2)
    assert losses[1] == pytest.approx(1.5 * losses[0])
    assert {"data_hash", "split", "loss", "alpha", "gamma"} <= set(rep["tci"]["checked"]["phase1"]["ctr"])
    (w,) = [w for w in rep["warnings"] if "trained differently" in w]
    assert "seed 0, 3 (mean over 2 seeds) vs 0 (ctr)" in w and w.count("training.shared_expert_epochs 1 vs 4") == 1


def test_every_seed_of_a_several_seed_baseline_is_checked(run: Run, singles: dict[str, Path], capsys,
                                                        tmp_path: Path) -> None:
    st = tmp_path / "single_task"
    _as_seed(singles["focal"], st / "ctr" / "seed-0" / "phase1", 0)
    _as_seed(singles["bce"], st / "ctr" / "seed-1" / "phase1", 1)
    err = _refused(run, capsys, tmp_path, st)
    assert f"--baselines {st / 'ctr' / 'seed-1' / 'phase1'}: task 'ctr' is not comparable" in err
    assert "'bce' in the baseline, 'focal' in the joint run" in err
    # a seed directory without a checkpoint is named
    shutil.rmtree(st / "ctr" / "seed-1")
    (st / "ctr" / "seed-2").mkdir()
    err = _refused(run, capsys, tmp_path, st)
    assert f"--baselines {st / 'ctr' / 'seed-2'}: holds no single-task checkpoint" in err


def test_a_directory_without_baselines_names_the_accepted_layouts(run: Run, capsys, tmp_path: Path) -> None:
    (tmp_path / "empty" / "ctr").mkdir(parents=True)
    err = _refused(run, capsys, tmp_path, tmp_path / "empty")
    assert f"--baselines {tmp_path / 'empty'}: holds no baselines.json and no single-task checkpoint" in err
    assert "DIR/<task>/seed-<n>/phase2|phase1 (a several-seed compare's)" in err and "baselines.json" in err
