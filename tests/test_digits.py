"""digits.py: each stage's command line is what the README says, and bad input is one line, exit 2."""
import argparse

import pytest

import digits
import train_imagenet as ti


def commands(tmp_path, *extra):
    args = argparse.Namespace(out=str(tmp_path), data="mnist", cache_dir=None, seed=0, teacher_kimg=None, eval_num=500)
    return digits.stage_commands(args, list(extra))


def test_stage_commands(tmp_path):
    cmds = commands(tmp_path, "--weighting", "adaptive")
    assert list(cmds) == list(digits.STAGES)
    teacher = ti.parse_config(cmds["teacher"][3:])                     # after python -u train_imagenet.py
    guide = ti.parse_config(cmds["guide"][3:])
    assert teacher["preset"] == guide["preset"] == "digits" and guide["kimg"] == teacher["kimg"] / 8
    for name in ("emd", "lmd", "cm"):
        assert cmds[name][cmds[name].index("--loss") + 1] == ("lmd" if name == "lmd" else "emd")
        assert "--weighting" in cmds[name] and cmds[name][-1] == str(tmp_path / name)
    assert cmds["cm"][cmds["cm"].index("--p-zero") + 1] == "1"        # s = 0 only: consistency model
    assert "--p-zero" not in cmds["emd"]
    assert cmds["adv"][cmds["adv"].index("--init") + 1] == str(tmp_path / "emd")
    assert [r.split("=")[0] for r in cmds["eval"][cmds["eval"].index("--runs") + 1:][:4]] == ["emd", "lmd", "cm", "adv"]


def test_bad_input(tmp_path, capsys):
    for argv in (["--data", str(tmp_path / "missing")], ["--data", str(tmp_path), "--stages", "teacher,nope"]):
        with pytest.raises(SystemExit) as exit:
            digits.main(argv)
        assert exit.value.code == 2
    assert "does not exist" in capsys.readouterr().err
