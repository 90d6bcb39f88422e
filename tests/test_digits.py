"""digits.py: each stage's command line is what the README says, and bad input is one line, exit 2."""
import argparse
import sys

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
        assert cmds[name][-2:] == ["--weighting", "adaptive"]                # a flag after -- comes last: it wins
        assert cmds[name][cmds[name].index("--out") + 1] == str(tmp_path / name)
    assert cmds["cm"][cmds["cm"].index("--p-zero") + 1] == "1"        # s = 0 only: consistency model
    assert float(cmds["cm"][cmds["cm"].index("--lr") + 1]) == digits.CM_LR
    assert "--p-zero" not in cmds["emd"]
    assert cmds["adv"][cmds["adv"].index("--init") + 1] == str(tmp_path / "emd")
    assert [r.split("=")[0] for r in cmds["eval"][cmds["eval"].index("--runs") + 1:][:4]] == ["emd", "lmd", "cm", "adv"]


def test_bad_input(tmp_path, capsys):
    for argv in (["--data", str(tmp_path / "missing")], ["--data", str(tmp_path), "--stages", "teacher,nope"]):
        with pytest.raises(SystemExit) as exit:
            digits.main(argv)
        assert exit.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_wave_runs_its_stages_side_by_side_with_their_own_cpu_time_and_logs(tmp_path):
    """Two stages of one wave: both start at once (the fast one ends first and its failure is reported with
    its exit code), each gets its own CPU seconds (os.wait4), its output lands in OUT/<stage>.log, and a
    wave of 2 on 2 cores runs each single-threaded."""
    burn = "import os, time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n" \
           "print('burnt', os.environ['OMP_NUM_THREADS'])"
    commands = {"slow": [sys.executable, "-c", burn], "fails": [sys.executable, "-c", "print('oops'); exit(3)"]}
    done = digits.run_wave(["slow", "fails"], commands, tmp_path, cores=2)
    assert done["fails"][0] == 3 and done["slow"][0] == 0
    assert done["slow"][2] >= 0.5 > done["fails"][2]                       # CPU seconds: each its own
    assert digits.last_line(tmp_path / "slow.log") == "burnt 1"
    assert digits.last_line(tmp_path / "fails.log") == "oops"


def test_the_teacher_goes_on_from_the_guide_and_ends_as_a_run_trained_straight(tmp_path):
    """The guide is the teacher's run stopped early: a teacher started from a copy of the guide's state
    ends bit-identical to one trained from scratch, and the guide keeps its own state."""
    from test_train_imagenet import TINY, assert_same_tensors, kimg, state

    ti.main(TINY + kimg(3) + ["--out", str(tmp_path / "straight")])
    ti.main(TINY + kimg(1) + ["--out", str(tmp_path / "guide")])
    digits.teacher_from_guide(tmp_path)
    ti.main(TINY + kimg(3) + ["--out", str(tmp_path / "teacher")])
    a, b = state(tmp_path / "straight"), state(tmp_path / "teacher")
    assert a["step"] == b["step"] == 3 and state(tmp_path / "guide")["step"] == 1
    for key in ("net", "ema"):
        assert_same_tensors(a[key], b[key])
    digits.teacher_from_guide(tmp_path)                                 # a teacher of its own is kept
    assert state(tmp_path / "teacher")["step"] == 3
