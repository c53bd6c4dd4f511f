"""The ple-adatt CLI: usage errors and wrong paths end in one line and exit code 2."""

from __future__ import annotations

import pytest

from ple_adatt.cli import main
from ple_adatt.data.synthetic import write_parquet


def test_a_directory_given_as_a_config_file_is_named(tmp_path, capsys):
    data = write_parquet(tmp_path / "d.parquet", rows=100, seed=0)
    rc = main(["validate", "--no-tracking", "--data", str(data), "--config", str(tmp_path),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"ple-adatt validate: error: {tmp_path}: is a directory; expected a file"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("rows", "message"), [("0", "must be >= 1, got 0"), ("-5", "must be >= 1, got -5"),
                                               ("ten", "expected an integer, got 'ten'")])
def test_generate_rejects_a_bad_row_count_as_a_usage_error(tmp_path, capsys, rows, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--out", str(tmp_path / "g.parquet"), "--rows", rows])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"ple-adatt generate: error: argument --rows: {message}" in err
    assert "Traceback" not in err and not (tmp_path / "g.parquet").exists()


@pytest.mark.parametrize("command", ["generate", "convert-adult"])
def test_a_directory_as_the_parquet_out_is_refused_naming_it_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                               command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    src = tmp_path / "adult.data"
    src.write_text("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, "
                   "Male, 2174, 0, 40, United-States, <=50K\n")
    extra = ["--rows", "10"] if command == "generate" else ["--src", str(src)]
    rc = main([command, "--out", "data/", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"ple-adatt {command}: error: --out data: is a directory;"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adult.data", "data"]
    assert not any((tmp_path / "data").iterdir())


def test_generate_refuses_an_out_that_is_not_parquet(tmp_path, capsys):
    rc = main(["generate", "--out", str(tmp_path / "x.csv"), "--rows", "10"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {tmp_path / 'x.csv'}: the file written is Parquet; name it *.parquet" in err
    assert not any(tmp_path.iterdir())


def test_a_failed_parquet_write_removes_its_temporary_file(tmp_path):
    import pyarrow as pa

    from ple_adatt.data.files import write_table_atomic

    with pytest.raises(TypeError):  # pyarrow refuses the unknown keyword after the temp file exists
        write_table_atomic(pa.table({"a": [1]}), tmp_path / "t.parquet", no_such_option=1)
    assert not any(tmp_path.iterdir())
    assert write_table_atomic(pa.table({"a": [1]}), tmp_path / "t.parquet").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_help_is_plain_text_and_train_phase2_suggests_a_phase2_key(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "``" not in top and "Run 'ple-adatt COMMAND --help'" in " ".join(top.split())
    with pytest.raises(SystemExit):
        main(["train-phase2", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--set training.cluster_finetune_epochs=3" in text and "shared_expert_epochs" not in text


@pytest.mark.parametrize("stage_args", [
    ["validate", "--data", "nope.parquet", "--config", "CFG_DATA"],
    ["train-phase1", "--data", "DATA", "--data-config", "CFG_DATA", "--config", "CFG_DATA"],
    ["train-phase2", "--checkpoint", "no-such-checkpoint", "--data", "DATA"],
], ids=["missing-data", "data-config-as-config", "missing-checkpoint"])
def test_argument_errors_stop_before_mlflow_is_touched(tmp_path, capsys, monkeypatch, stage_args):
    """With tracking on, a typo must not leave FAILED runs, nor create an empty mlflow.db here."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = write_parquet(tmp_path / "d.parquet", rows=100, seed=0)
    monkeypatch.chdir(tmp_path)
    for k in ("MLFLOW_TRACKING_URI", "PLE_ADATT_NO_TRACKING", "PLE_ADATT_TRACKING_URI_ORIGIN"):
        monkeypatch.delenv(k, raising=False)
    subst = {"CFG_DATA": str(root / "configs/data/synthetic.yaml"), "DATA": str(data)}
    rc = main([subst.get(a, a) for a in stage_args] + ["--out", "out"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "error:" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_generate_does_not_replace_an_existing_dataset_unless_forced(tmp_path, capsys):
    out = tmp_path / "g.parquet"
    assert main(["generate", "--out", str(out), "--rows", "20"]) == 0
    before = out.read_bytes()
    assert main(["generate", "--out", str(out), "--rows", "10", "--seed", "3"]) == 2
    assert f"--out {out}: exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["generate", "--out", str(out), "--rows", "10", "--seed", "3", "--force"]) == 0
    assert out.read_bytes() != before


def test_convert_adult_does_not_replace_an_existing_dataset_unless_forced(tmp_path, capsys):
    src = tmp_path / "adult.data"
    src.write_text("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, "
                   "Male, 2174, 0, 40, United-States, <=50K\n")
    out = write_parquet(tmp_path / "synthetic.parquet", rows=20, seed=0)  # another dataset at that path
    before = out.read_bytes()
    assert main(["convert-adult", "--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ple-adatt convert-adult: error: --out {out}: exists; pass --force to replace it"
    assert out.read_bytes() == before
    assert main(["convert-adult", "--src", str(src), "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != before


def test_a_misspelt_option_is_named_before_the_option_it_was_meant_to_be_is_missed(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--phase1", "a", "--phase2", "b", "--validaton", "v", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip().splitlines()[-1] == ("ple-adatt report: error: unrecognized option --validaton "
                                            "(did you mean --validation?)")
    assert not (tmp_path / "r").exists()
    # an abbreviation argparse accepts is no typo: the stage runs (and stops here at the missing input)
    assert main(["report", "--phase1", "a", "--phase2", "b", "--valid", "v", "--out", str(tmp_path / "r"),
                 "--no-tracking"]) == 2
    assert "--phase1 a: no such directory" in capsys.readouterr().err
