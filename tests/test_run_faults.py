"""Faults of a run (issue 11), as a user meets them: bad flags and paths of train_imagenet.py and
sample.py (exit code 2, one line, no traceback; dataset.py's own are in test_dataset_faults.py), a
corrupt or non-finite checkpoint, a full disk during a save, two runs on one --out, a rerun with
other flags or data. Each case is checked against what it must leave on disk."""
import errno
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import checkpoint
import sample
import train_imagenet as ti

ROOT = Path(__file__).resolve().parents[1]
B = 8
TINY = ["--data", "synthetic", "--device", "cpu", "--batch", str(B), "--status-kimg", "1", "--snapshot-kimg", "1",
        "--preset", "tiny", "--resolution", "16"]


def kimg(steps):
    return ["--kimg", str(steps * B / 1000)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2-step teacher run folder (its snapshot-prev.pt is step 1's)."""
    out = tmp_path_factory.mktemp("faults") / "teacher"
    ti.main(TINY + kimg(1) + ["--out", str(out)])
    ti.main(TINY + kimg(2) + ["--out", str(out)])
    return out


def start(*argv):
    """`python argv...` in the repository, started (the caller collects it)."""
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_bad_flags_and_paths_exit_2_with_one_line(teacher, tmp_path):
    (tmp_path / "empty.pt").touch()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    snap = torch.load(teacher / "snapshot.pt", weights_only=True)
    next(iter(snap["ema"].values())).fill_(float("nan"))
    torch.save(dict(snap, sha256=checkpoint.digest(snap)), tmp_path / "nan.pt")     # whole, but NaN weights
    train = ["train_imagenet.py", "--data", "synthetic", "--device", "cpu", "--out", str(tmp_path / "x")]
    distill = train + ["--stage", "distill", "--guidance", "none", "--teacher"]
    grid = ["--grid", str(tmp_path / "g.png")]
    cases = [
        (train + ["--kimg", "-1"], "--kimg must be positive"),
        (train + ["--kimg", "0"], "--kimg must be positive"),
        (train + ["--batch", "0"], "--batch must be positive"),
        (train + ["--batch", "-16"], "--batch must be positive"),
        (train + ["--batch-gpu", "-4"], "--batch-gpu must be positive"),
        (train + ["--gpus", "2", "--batch", "15"], "--batch 15 must be divisible by 2 processes"),
        (train + ["--ema-kimg", "-1"], "--ema-kimg must be >= 0"),
        (train + ["--label-dropout", "2"], "--label-dropout must lie in [0, 1]"),
        (train + ["--preset", "tiny", "--resolution", "30"], "--resolution 30 must be a multiple of 4"),
        (train + ["--lam-min", "3", "--lam-max", "1"], "--lam-min 3.0 is above --lam-max 1.0"),
        (train + ["--out", "/dev/null/run"], "--out /dev/null/run: /dev/null is a file"),
        (train + ["--stage", "distill"], "--stage distill needs --teacher"),
        (train + ["--guide", str(teacher)], "--guide is for --stage distill and adv"),
        (distill + [str(tmp_path / "missing")], "no snapshot at"),
        (distill + [str(tmp_path / "empty.pt")], "not a checkpoint: "),
        (distill + [str(tmp_path / "text.pt")], "not a checkpoint: "),
        (distill + [str(tmp_path / "nan.pt")], "has non-finite weights"),
        (distill + [str(teacher), "--p-zero", "0.6", "--p-diag", "0.6"], "exceeds 1"),
        (["sample.py", "--ckpt", str(teacher), "--num", "0"] + grid, "--num must be positive"),
        (["sample.py", "--ckpt", str(teacher), "--seeds", "5-3"] + grid, "--seeds '5-3' is empty"),
        (["sample.py", "--ckpt", str(teacher), "--seeds", "a"] + grid, "--seeds expects integers"),
        (["sample.py", "--ckpt", str(teacher), "--steps", "0"] + grid, "--steps must be at least 1"),
        (["sample.py", "--ckpt", str(teacher), "--grid", "/dev/null/g.png"], "/dev/null is a file"),
        (["sample.py", "--ckpt", str(tmp_path / "nan.pt")] + grid, "has non-finite weights"),
        (["sample.py", "--ckpt", str(tmp_path / "empty.pt")] + grid, "not a checkpoint: "),
    ]
    if not torch.cuda.is_available():
        cases += [(train + ["--device", "cuda"], "--device cuda, but no CUDA device"),
                  (train + ["--gpus", "2", "--batch", "16", "--device", "auto"], "--gpus 2, but 0 CUDA devices")]
    for flags, message in cases:                                    # in this process: every case
        main = ti.main if flags[0] == "train_imagenet.py" else sample.main
        with pytest.raises(checkpoint.UsageError) as error:
            main(flags[1:])
        assert message in str(error.value) and "\n" not in str(error.value), (flags, error.value)
    # As commands: a few cases of each kind (each process spends seconds importing torch).
    commands = cases[::4] + [(["dataset.py", str(tmp_path / "missing")], "dataset source not found")]
    processes = [start(*flags) for flags, _ in commands]
    for (flags, message), process in zip(commands, processes):
        out, err = process.communicate(timeout=600)
        assert (process.returncode, err.count("\n")) == (2, 1), (flags, err)
        assert message in err and "Traceback" not in err, (flags, err)
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "x").exists()


def test_corrupt_training_state_is_refused_naming_the_previous_one(teacher, tmp_path):
    out = tmp_path / "run"
    ti.main(TINY + kimg(1) + ["--out", str(out)])
    ti.main(TINY + kimg(2) + ["--out", str(out)])
    state = out / "training-state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)   # 4 KiB in the middle: tensor bytes
    state.write_bytes(data)
    with pytest.raises(checkpoint.UsageError, match=r"training-state.pt is corrupt.*training-state-prev.pt of step 1"):
        ti.main(TINY + kimg(3) + ["--out", str(out)])
    os.replace(out / "training-state-prev.pt", state)                  # what the message says to do
    ti.main(TINY + kimg(3) + ["--out", str(out)])
    assert torch.load(state, weights_only=True)["step"] == 3


def test_non_finite_weights_are_refused_by_load_snapshot_and_sample(teacher, tmp_path):
    snap = torch.load(teacher / "snapshot.pt", weights_only=True)
    del snap["sha256"]                                                  # a file without checksum: the values decide
    next(iter(snap["ema"].values())).fill_(float("inf"))
    torch.save(snap, tmp_path / "snapshot.pt")
    with pytest.raises(checkpoint.UsageError, match="non-finite weights .*retrain or restore it"):
        ti.load_snapshot(tmp_path)
    with pytest.raises(checkpoint.UsageError, match="non-finite weights"):
        sample.main(["--ckpt", str(tmp_path), "--grid", str(tmp_path / "g.png")])
    assert checkpoint.digest(snap) != checkpoint.digest(torch.load(teacher / "snapshot.pt", weights_only=True))


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ti.main(TINY + kimg(1) + ["--out", str(out)])
    before = (out / "training-state.pt").read_bytes()
    write = checkpoint._RecordingFile.write

    def full_after_1_kib(self, data):                               # the disk fills up inside torch.save
        if self.tell() + len(data) > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, data)
    monkeypatch.setattr(checkpoint._RecordingFile, "write", full_after_1_kib)
    with pytest.raises(checkpoint.UsageError, match=r"no space left on device at .*snapshot.pt: free space and "
                                                    r"rerun .* the previous checkpoint of step 1 is intact"):
        ti.main(TINY + kimg(2) + ["--out", str(out)])
    assert (out / "training-state.pt").read_bytes() == before
    assert not list(out.glob("*.tmp")) and not (out / "run.lock").exists()
    monkeypatch.undo()
    (out / "snapshot.pt.killed.tmp").write_bytes(b"x" * 10)           # a save killed midway left this
    ti.main(TINY + kimg(2) + ["--out", str(out)])                     # the rerun resumes and cleans up
    assert torch.load(out / "training-state.pt", weights_only=True)["step"] == 2
    assert not list(out.glob("*.tmp"))


def test_not_enough_disk_space_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1 << 20))
    with pytest.raises(checkpoint.UsageError, match="no space left on device for .* the checkpoints need"):
        ti.main(TINY + kimg(1) + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "training-state.pt").exists()


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = checkpoint.RunLock(out)
    lock.path.write_text(f"{other.pid} {lock.mine.split()[1]}\n")
    try:
        with pytest.raises(checkpoint.UsageError, match=f"used by the running process {other.pid}"):
            ti.main(TINY + kimg(1) + ["--out", str(out)])
    finally:
        other.kill()
        other.wait()
    ti.main(TINY + kimg(1) + ["--out", str(out)])                     # its process is gone: taken over
    assert f"taking over {lock.path} of process {other.pid}" in capsys.readouterr().out
    assert not lock.path.exists()                                     # released at the end
    lock.path.write_text("123 some-other-host\n")
    with pytest.raises(checkpoint.UsageError, match="used by a run on some-other-host"):
        ti.main(TINY + kimg(2) + ["--out", str(out)])


def test_a_rerun_with_other_flags_or_data_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    ti.main(TINY + kimg(1) + ["--out", str(out)])
    with pytest.raises(checkpoint.UsageError, match=r"belongs to another run \(lr: 0.01 there, 0.02 here; "
                                                    r"seed: 0 there, 1 here\).*--force-resume"):
        ti.main(TINY + kimg(2) + ["--out", str(out), "--seed", "1", "--lr", "0.02"])
    state = torch.load(out / "training-state.pt", weights_only=True)   # as if built from other images
    state["config"]["data_sha"] = "0123456789abcdef"
    torch.save(dict(state, sha256=checkpoint.digest(state)), out / "training-state.pt")
    with pytest.raises(checkpoint.UsageError, match="data_sha: '0123456789abcdef' there, '[0-9a-f]{16}' here"):
        ti.main(TINY + kimg(2) + ["--out", str(out)])
    with pytest.raises(checkpoint.UsageError, match="preset: 'tiny' there, 'digits' here.*start over$"):
        ti.main(TINY + kimg(2) + ["--out", str(out), "--preset", "digits", "--force-resume"])
    capsys.readouterr()
    ti.main(TINY + kimg(2) + ["--out", str(out), "--seed", "1", "--force-resume"])
    assert "--force-resume: " in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["forced_changes"][0] == "step 1: seed: 0 there, 1 here" and config["seed"] == 1
    assert config["forced_changes"][1].startswith("step 1: data_sha: '0123456789abcdef' there")


def _worker_with_a_user_mistake(args, rank=0, local_rank=0, world_size=1):
    if rank == 0:                                                   # as the checks that only rank 0 makes
        raise checkpoint.UsageError(f"{args} is not right here")


def test_a_user_mistake_inside_spawned_processes_is_one_line_and_exit_2(capfd):
    """--gpus N: a UsageError met inside a worker (disk space, data digest, a save) ends the run with
    the worker's one line and exit code 2, not the spawn's wrapped traceback."""
    import launch
    with pytest.raises(SystemExit) as exit_:
        launch.launch(_worker_with_a_user_mistake, "--flag", 2, "cpu", user_errors=(checkpoint.UsageError,))
    err = capfd.readouterr().err
    assert exit_.value.code == 2
    assert "error (rank 0): --flag is not right here" in err and "Traceback" not in err, err


def test_gpus_under_torchrun_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(checkpoint.UsageError, match="--gpus 2 under torchrun, which starts the processes itself"):
        ti.main(["--data", "synthetic", "--device", "cpu", "--gpus", "2", "--batch", "16", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
