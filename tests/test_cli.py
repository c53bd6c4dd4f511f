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
