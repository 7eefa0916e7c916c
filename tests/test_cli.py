"""The command line: one-line errors with exit code 2, library argument names shown as flags."""

import subprocess
import sys

import pytest

from mobilenetv2.cli import as_flags, main


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mobilenetv2", "convert", str(tmp_path / "x.ckpt"), "-o",
                             str(tmp_path / "y.pt")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not found" in result.stderr


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_library_errors_name_arguments_and_the_command_names_flags(dataset, tmp_path, capsys):
    from mobilenetv2.config import TrainConfig
    from mobilenetv2.errors import UserError

    with pytest.raises(UserError, match="`batch_size` must be >= 1"):
        TrainConfig(batch_size=0)
    assert main(["train", "--data", str(dataset), "--output", str(tmp_path / "run"), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size must be >= 1" in err and "`" not in err
    assert as_flags("`warmup_epochs` must not exceed `epochs`") == "--warmup-epochs must not exceed --epochs"
