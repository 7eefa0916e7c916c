"""Every checkpoint format users have, loaded through `load_model`, gives the source network's logits."""

import subprocess
import sys

import pytest

from mobilenetv2.cli import main


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
