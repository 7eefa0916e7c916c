"""The command line: one-line errors with exit code 2, library argument names shown as flags."""

import re
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


def test_train_help_lists_every_option_once_under_its_group(capsys):
    """`train --help` in groups by concern: every TrainConfig field in exactly one group, printed under it."""
    import dataclasses

    from mobilenetv2.cli.groups import TRAIN_GROUPS
    from mobilenetv2.config import TrainConfig

    grouped = [name for _, _, names in TRAIN_GROUPS for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))  # each once, none missing
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    sections = re.split(r"\n(?=\S[^\n]*:\n)", text)  # argparse: "title:" at column 0, then its flags
    titles = [section.split(":\n")[0] for section in sections[1:]]
    assert titles == ["options"] + [title for title, _, _ in TRAIN_GROUPS]
    for (title, _, names), section in zip(TRAIN_GROUPS, sections[2:]):
        flags = set(re.findall(r"^  (--[a-z0-9-]+)", section, re.M))
        assert {"--" + name.replace("_", "-") for name in names} <= flags, title


@pytest.mark.parametrize("command, groups", [
    ("eval", ["what is evaluated", "how", "output"]),
    ("export", ["what is written", "the graph", "int8", "MindSpore"]),
    ("serve", ["the model", "network", "batching and limits"])])
def test_commands_with_many_flags_show_them_in_groups(capsys, command, groups):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    titles = re.findall(r"^(\S[^\n]*):\n", capsys.readouterr().out, re.M)
    assert titles[titles.index("options") + 1:] == groups
