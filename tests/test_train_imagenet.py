"""train_imagenet.py end to end on a CPU: tiny preset, synthetic 16x16 images, a few steps per run.

The tests compare two independent computations: an interrupted-and-resumed run against an
uninterrupted one, 2 processes (gloo) and gradient accumulation against one process, DDP gradients
against the single-process gradient on the concatenated data, a run with a skipped step against a
shorter run, an adversarial finetune with and without its adversarial term.
"""
import functools
import json
import math
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import launch
import losses
import train_imagenet as ti
import unet
from flowmap import as_velocity, guided_velocity, sample_flow_map

B = 8                                                                   # global batch of every run
BASE = ["--data", "synthetic", "--device", "cpu", "--batch", str(B), "--status-kimg", "1", "--snapshot-kimg", "1"]
TINY = BASE + ["--preset", "tiny", "--resolution", "16"]


def kimg(steps):
    return ["--kimg", str(steps * B / 1000)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A teacher (3 steps) and a weak guide (2 steps), shared by the distillation tests."""
    root = tmp_path_factory.mktemp("runs")
    ti.main(TINY + kimg(3) + ["--out", str(root / "teacher")])
    ti.main(TINY + kimg(2) + ["--out", str(root / "guide")])
    return root


def distill(runs, out, *flags, teacher="teacher", guide="guide"):
    """argv of a distillation run; the preset and resolution come from the teacher."""
    argv = BASE + ["--stage", "distill", "--teacher", str(runs / teacher), "--out", str(out), *flags]
    return argv + (["--guide", str(runs / guide)] if guide else [])


def state(out):
    return torch.load(out / "training-state.pt", weights_only=True)


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_tensors(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), k


# ----------------------------------------------------------------------------------------------
# Every stage runs; snapshots rebuild their networks.

def test_teacher_then_distill_emd_and_lmd(runs, tmp_path):
    ti.main(distill(runs, tmp_path / "emd", *kimg(2), "--loss", "emd", "--guidance", "auto"))
    ti.main(distill(runs, tmp_path / "lmd", *kimg(2), "--loss", "lmd", "--guidance", "cfg", guide=None))
    ti.main(distill(runs, tmp_path / "none", *kimg(1), "--guidance", "none", "--precision", "bf16",
                    "--weighting", "adaptive", guide=None))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t, s = torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.5])
    label = torch.eye(10)[:2]
    for out, stage, steps in [(runs / "teacher", "teacher", 3), (runs / "guide", "teacher", 2),
                              (tmp_path / "emd", "distill", 2), (tmp_path / "lmd", "distill", 2),
                              (tmp_path / "none", "distill", 1)]:
        assert (out / "config.json").exists()
        assert log(out)[-1]["step"] == steps and log(out)[-1]["skipped"] == 0
        net, config = ti.load_snapshot(out)
        trained = state(out)
        assert config["stage"] == stage and trained["step"] == steps
        assert_same_tensors(net.state_dict(), trained["ema"])
        lam = torch.tensor([1.0, 2.5]) if config["cond_lam"] else None
        assert net(x, t, s, label=label, lam=lam).shape == x.shape
    assert ti.load_snapshot(tmp_path / "emd")[1]["cond_lam"] is True
    assert ti.load_snapshot(tmp_path / "none")[1]["cond_lam"] is False


def test_student_starts_as_its_teacher(runs, tmp_path):
    """With lr 0 the student stays the teacher's EMA weights (init_student_from_teacher), and the
    zero-gain s and lam branches make it compute the teacher's velocity at s = t."""
    ti.main(distill(runs, tmp_path, *kimg(1), "--lr", "0"))
    student, _ = ti.load_snapshot(tmp_path)
    teacher, _ = ti.load_snapshot(runs / "teacher")
    x, t, label = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8]), torch.eye(10)[:2]
    F = student(x, t, t, label=label, lam=torch.tensor([1.0, 2.0]))
    assert torch.allclose(F, teacher(x, t, t, label=label), atol=1e-5)   # up to forced weight normalization


# ----------------------------------------------------------------------------------------------
# Resume: interrupted + rerun == uninterrupted.

def test_resume_after_sigterm_teacher(tmp_path, monkeypatch):
    argv = TINY + kimg(4) + ["--weighting", "adaptive"]
    ti.main(argv + ["--out", str(tmp_path / "straight")])

    calls = []
    def fm_loss_then_sigterm(*args, **kwargs):                         # SIGTERM during the second step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses.fm_loss(*args, **kwargs)
    monkeypatch.setattr(ti, "fm_loss", fm_loss_then_sigterm)
    ti.main(argv + ["--out", str(tmp_path / "resumed")])
    assert state(tmp_path / "resumed")["step"] == 2
    monkeypatch.undo()
    ti.main(argv + ["--out", str(tmp_path / "resumed")])             # the same command resumes

    a, b = state(tmp_path / "straight"), state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4
    for key in ("net", "ema", "weight"):
        assert_same_tensors(a[key], b[key])
    for i, adam_state in a["optimizer"]["state"].items():               # Adam's moments and step counts
        assert_same_tensors(adam_state, b["optimizer"]["state"][i])


def test_resume_distill_with_longer_kimg(runs, tmp_path, capsys):
    ti.main(distill(runs, tmp_path / "straight", *kimg(3)))
    ti.main(distill(runs, tmp_path / "resumed", *kimg(1)))
    ti.main(distill(runs, tmp_path / "resumed", *kimg(3)))
    a, b = state(tmp_path / "straight"), state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 3
    assert_same_tensors(a["net"], b["net"])
    assert_same_tensors(a["ema"], b["ema"])

    capsys.readouterr()
    ti.main(distill(runs, tmp_path / "resumed", *kimg(3)))          # finished: a no-op
    assert "nothing to do" in capsys.readouterr().out
    assert state(tmp_path / "resumed")["step"] == 3


# ----------------------------------------------------------------------------------------------
# Processes and accumulation do not change the result.

def test_two_processes_and_accumulation_match_one_process(runs, tmp_path):
    flags = (*kimg(2), "--lr", "1e-3", "--weighting", "adaptive")
    ti.main(distill(runs, tmp_path / "one", *flags))
    ti.main(distill(runs, tmp_path / "accumulate", *flags, "--batch-gpu", "2"))
    ti.main(distill(runs, tmp_path / "two", *flags, "--gpus", "2"))   # spawn, gloo: 2 x 4 samples

    one = state(tmp_path / "one")
    init = ti.load_snapshot(runs / "teacher")[0].state_dict()
    moved = max((one["net"][k] - init[k]).abs().max() for k in init)
    assert moved > 1e-4                                                 # the runs did train
    for other in ("accumulate", "two"):
        b = state(tmp_path / other)
        for key in ("net", "ema", "weight"):
            assert_same_tensors(one[key], b[key], rtol=1e-5, atol=1e-6)
        # Adam largely hides a wrong gradient scale; the logged gradient norm does not.
        assert log(tmp_path / other)[-1]["grad_norm"] == pytest.approx(log(tmp_path / "one")[-1]["grad_norm"],
                                                                       rel=1e-5)


def _backward(loss):
    """loss.backward(), but a loss cut off from the network (an exercise's stub) fails with what is wrong
    with the objective, as tests/test_losses.py does, not with autograd's internal error."""
    if not loss.requires_grad:
        raise AssertionError("your loss has no gradient with respect to the network: it must contain "
                             "F_theta = net(x_t, t, s) with its graph (only the target is stop-gradient)")
    loss.backward()


def _ddp_gradients(rank, world_size, port, path):
    """One process of a gloo group: EMD and LMD gradients through DDP on this rank's half of the data."""
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    student, velocity, data = _gradient_problem()
    ddp = DistributedDataParallel(student)
    grads = []
    for loss_fn in (losses.emd_loss, losses.lmd_loss):
        student.zero_grad()
        x_t, t, s, label, lam = (d[rank::world_size] for d in data)
        _backward(loss_fn(ddp, velocity, x_t, t, s, label=label, lam=lam).mean())
        grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        gathered = [torch.empty_like(grad) for _ in range(world_size)]
        dist.all_gather(gathered, grad)
        grads.append(torch.stack(gathered))
    if rank == 0:
        torch.save(grads, path)
    dist.destroy_process_group()
    ti.exit_worker()


def _gradient_problem(n=4):
    """A tiny student with every gain nonzero (so s and lam matter), an autoguided tiny teacher and
    data, in float64 so that the two ways of computing the gradient agree to rounding."""
    gen = torch.Generator().manual_seed(0)

    def tiny(seed, **kwargs):
        torch.manual_seed(seed)
        return unet.UNet(img_resolution=16, num_classes=10, **unet.PRESETS["tiny"], **kwargs).double()

    student, teacher, guide = tiny(0, cond_s=True, cond_lam=True), tiny(1).eval(), tiny(2).eval()
    with torch.no_grad():
        for p in student.parameters():
            if p.ndim == 0:
                p.copy_(0.5 + torch.rand([], generator=gen))
    velocity = functools.partial(guided_velocity, as_velocity(teacher), as_velocity(guide))
    f64 = dict(generator=gen, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(n, **f64)
    label = torch.eye(10, dtype=torch.float64)[torch.randint(10, (n,), generator=gen)]
    data = (torch.randn(n, 3, 16, 16, **f64), t, t * torch.rand(n, **f64), label, 1 + 2 * torch.rand(n, **f64))
    return student, velocity, data     # data: x_t, t, s, label, lam


@pytest.mark.ex_emd
@pytest.mark.ex_lmd
def test_ddp_gradients_are_synchronized_and_equal_the_full_batch_gradient(tmp_path):
    """docs/method.md §11: the JVP runs on net.module, the trainable forward through DDP, so gradients are
    all-reduced; on 2 ranks with different data they equal the one-process gradient of all the data."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_gradients, args=(2, port, tmp_path / "grads.pt"), nprocs=2)
    gathered = torch.load(tmp_path / "grads.pt", weights_only=True)

    student, velocity, data = _gradient_problem()
    for loss_fn, ranks in zip((losses.emd_loss, losses.lmd_loss), gathered):
        assert torch.equal(ranks[0], ranks[1])                          # the same on every rank

        def grad_of(rows):
            student.zero_grad()
            _backward(loss_fn(student, velocity, *(d[rows] for d in data[:3]), label=data[3][rows],
                              lam=data[4][rows]).mean())
            return torch.cat([p.grad.flatten() for p in student.parameters()])

        full, half = grad_of(slice(None)), grad_of(slice(0, None, 2))
        assert torch.allclose(ranks[0], full, rtol=1e-9, atol=1e-12)
        assert (half - full).norm() > 0.1 * full.norm()                # rank 0's data alone is far off


# ----------------------------------------------------------------------------------------------
# Errors and the NaN guard.

def test_checkpoints_of_another_preset_or_stage_are_clear_errors(runs, tmp_path):
    teacher = str(runs / "teacher")
    with pytest.raises(ValueError, match="preset: 'tiny' there, 'XS' here"):
        ti.main(BASE + ["--preset", "XS", "--resolution", "16", "--out", teacher])
    with pytest.raises(ValueError, match="stage: 'teacher' there, 'distill' here"):
        ti.main(distill(runs, teacher))
    ti.main(distill(runs, tmp_path / "student", *kimg(1)))
    with pytest.raises(ValueError, match="--teacher .* written by --stage distill .* --stage teacher checkpoint"):
        ti.main(distill(runs, tmp_path / "x", teacher=tmp_path / "student"))
    with pytest.raises(ValueError, match="--guide .* written by --stage distill"):
        ti.main(distill(runs, tmp_path / "x", guide=tmp_path / "student"))
    with pytest.raises(ValueError, match="preset 'tiny', but --preset 'S'"):
        ti.main(distill(runs, tmp_path / "x", "--preset", "S"))
    with pytest.raises(ValueError, match="--jvp fd with --precision bf16"):
        ti.main(distill(runs, tmp_path / "x", "--jvp", "fd", "--precision", "bf16"))


def test_dry_run_resolves_defaults_from_presets_and_teacher(runs, capsys):
    ti.main(distill(runs, runs / "unused", "--dry-run"))
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "tiny" and cfg["resolution"] == 16 and cfg["loss"] == "emd"
    assert cfg["lr"] == pytest.approx(ti.PRESETS["tiny"]["lr"] * 0.01)
    assert cfg["cond_s"] and cfg["cond_lam"] and cfg["dropout"] == 0
    assert not (runs / "unused").exists()


def test_nan_guard_skips_the_step_on_every_parameter(tmp_path, monkeypatch):
    """A run whose second step has a NaN loss ends with the weights of a one-step run."""
    ti.main(TINY + kimg(1) + ["--out", str(tmp_path / "one-step")])

    calls = []
    def fm_loss_nan_in_second_step(*args, **kwargs):
        calls.append(1)
        loss = losses.fm_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(ti, "fm_loss", fm_loss_nan_in_second_step)
    ti.main(TINY + kimg(2) + ["--out", str(tmp_path / "skipped")])

    a, b = state(tmp_path / "one-step"), state(tmp_path / "skipped")
    assert (b["step"], b["skipped"]) == (2, 1)
    assert log(tmp_path / "skipped")[-1]["skipped"] == 1
    assert_same_tensors(a["net"], b["net"])
    assert_same_tensors(a["ema"], b["ema"])
    assert torch.isfinite(torch.cat([v.flatten() for v in b["net"].values()])).all()


# ----------------------------------------------------------------------------------------------
# Adversarial finetuning (--stage adv).

@pytest.fixture(scope="module")
def distilled(runs):
    """runs/ayf: a guided EMD student (2 steps) to finetune."""
    ti.main(distill(runs, runs / "ayf", *kimg(2)))
    return runs / "ayf"


def adv(runs, out, *flags, init="ayf"):
    """argv of an adversarial finetune of runs/<init> with the teacher and guide of `runs`."""
    return BASE + ["--stage", "adv", "--init", str(runs / init), "--teacher", str(runs / "teacher"),
                   "--guide", str(runs / "guide"), "--out", str(out), *flags]


def adam_moments(optimizer_state):
    """Adam's first moments of every parameter; with beta1 = 0 (the head's) the last gradient itself."""
    return [s["exp_avg"] for _, s in sorted(optimizer_state["state"].items())]


def test_adv_snapshot_samples_like_distill_and_the_encoder_stays_frozen(runs, distilled, tmp_path, monkeypatch):
    """D's encoder is the teacher network itself: after training it equals its snapshot and holds no
    gradient, while every head parameter got one. The snapshot samples like the student it came from."""
    loaded = {}
    load_snapshot = ti.load_snapshot
    def load_and_keep(path, device="cpu"):
        net, config = load_snapshot(path, device)
        loaded[str(path)] = net
        return net, config
    monkeypatch.setattr(ti, "load_snapshot", load_and_keep)
    ti.main(adv(runs, tmp_path, *kimg(2), "--adv-lr", "1e-2"))
    monkeypatch.undo()

    # The teacher, whose encoder is D's, is bit for bit what its snapshot holds and took no gradient.
    encoder = loaded[str(runs / "teacher")]
    assert_same_tensors(encoder.state_dict(), ti.load_snapshot(runs / "teacher")[0].state_dict())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert not encoder.training

    trained = state(tmp_path)
    assert trained["step"] == 2
    assert all(g.abs().max() > 0 and torch.isfinite(g).all() for g in adam_moments(trained["disc_optimizer"]))
    stats = log(tmp_path)[-1]
    assert stats["skipped"] == 0
    assert all(math.isfinite(stats[k]) for k in ("g_adv", "d_loss", "d_real_minus_fake", "r1_r2"))

    # The snapshot rebuilds and samples exactly as a distilled student's does.
    net, config = ti.load_snapshot(tmp_path)
    student, student_config = ti.load_snapshot(distilled)
    assert config["stage"] == "adv"
    assert_same_tensors(net.state_dict(), trained["ema"])
    for key in ("preset", "resolution", "num_classes", "cond_s", "cond_lam", "dropout", "guidance"):
        assert config[key] == student_config[key], key
    z, label, lam = torch.randn(2, 3, 16, 16), torch.eye(10)[:2], torch.tensor([1.0, 2.0])
    x, x_student = (sample_flow_map(n, z, 2, label=label, lam=lam) for n in (net, student))
    assert x.shape == z.shape and torch.isfinite(x).all()
    assert 0 < (x - x_student).abs().max() < 1                          # finetuned, not replaced


def test_adv_term_alone_moves_the_generator_and_the_d_step_uses_the_fakes_before_it(runs, distilled, tmp_path,
                                                                                     monkeypatch):
    """With the EMD term multiplied by 0, the generator's gradient is the adversarial term's: zero at
    --adv-weight 0, nonzero at 1. The D step of step 0 sees the fakes made before the generator's
    update, so it is the same in both runs."""
    monkeypatch.setattr(ti, "emd_loss", lambda *args, **kwargs: 0 * losses.emd_loss(*args, **kwargs))
    for w in ("0", "1"):
        ti.main(adv(runs, tmp_path / w, *kimg(1), "--adv-weight", w, "--lr", "1e-3", "--adv-lr", "1e-2"))
    off, on = state(tmp_path / "0"), state(tmp_path / "1")

    assert all(torch.equal(m, torch.zeros_like(m)) for m in adam_moments(off["optimizer"]))
    assert all(m.abs().max() > 0 for m in adam_moments(on["optimizer"]))       # every generator parameter
    assert max((on["net"][k] - off["net"][k]).abs().max() for k in on["net"]) > 1e-4
    assert_same_tensors(off["disc"], on["disc"])
    assert all(m.abs().max() > 0 for m in adam_moments(on["disc_optimizer"]))  # every head parameter


def test_adv_resume_is_bit_identical(runs, distilled, tmp_path):
    flags = ("--lr", "1e-3", "--adv-lr", "1e-2", "--adv-weight", "1")
    ti.main(adv(runs, tmp_path / "straight", *kimg(3), *flags))
    ti.main(adv(runs, tmp_path / "resumed", *kimg(1), *flags))
    ti.main(adv(runs, tmp_path / "resumed", *kimg(3), *flags))
    a, b = state(tmp_path / "straight"), state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 3
    for key in ("net", "ema", "disc"):
        assert_same_tensors(a[key], b[key])
    for key in ("optimizer", "disc_optimizer"):
        for i, adam_state in a[key]["state"].items():
            assert_same_tensors(adam_state, b[key]["state"][i])


def test_adv_two_processes_and_accumulation_match_one_process(runs, distilled, tmp_path):
    flags = (*kimg(2), "--lr", "1e-3", "--adv-lr", "1e-2", "--adv-weight", "1")
    ti.main(adv(runs, tmp_path / "one", *flags))
    ti.main(adv(runs, tmp_path / "accumulate", *flags, "--batch-gpu", "2"))
    ti.main(adv(runs, tmp_path / "two", *flags, "--gpus", "2"))       # spawn, gloo: 2 x 4 samples

    one = state(tmp_path / "one")
    for other in ("accumulate", "two"):
        b = state(tmp_path / other)
        # atol: Adam's first step is lr g / (|g| + 1e-8), so the summation-order rounding of a gradient
        # entry near 1e-8 moves its weight by up to a few % of lr (measured: 2.6e-5 at lr 1e-3).
        for key in ("net", "ema", "disc"):
            assert_same_tensors(one[key], b[key], rtol=1e-5, atol=3e-5)
        for key in ("grad_norm", "g_adv", "d_loss", "d_real_minus_fake", "r1_r2"):
            assert log(tmp_path / other)[-1][key] == pytest.approx(log(tmp_path / "one")[-1][key], rel=1e-5)


def test_nan_in_the_d_loss_skips_both_updates(runs, distilled, tmp_path, monkeypatch):
    """A run whose second D objective is NaN ends with the generator, EMA and head of a one-step run."""
    flags = ("--lr", "1e-3", "--adv-lr", "1e-2")
    ti.main(adv(runs, tmp_path / "one-step", *kimg(1), *flags))

    calls, rpgan_d_objective = [], ti.rpgan_d_objective
    def d_objective_nan_in_second_step(*args, **kwargs):
        calls.append(1)
        d_obj, *parts = rpgan_d_objective(*args, **kwargs)
        return (d_obj * float("nan") if len(calls) == 2 else d_obj, *parts)
    monkeypatch.setattr(ti, "rpgan_d_objective", d_objective_nan_in_second_step)
    ti.main(adv(runs, tmp_path / "skipped", *kimg(2), *flags))

    a, b = state(tmp_path / "one-step"), state(tmp_path / "skipped")
    assert (b["step"], b["skipped"]) == (2, 1)
    for key in ("net", "ema", "disc"):
        assert_same_tensors(a[key], b[key])


def test_adv_checks_its_init_and_resolves_from_it(runs, distilled, tmp_path, capsys):
    with pytest.raises(ValueError, match="--init .* written by --stage teacher .* --stage distill checkpoint"):
        ti.main(adv(runs, tmp_path, init="teacher"))
    argv = adv(runs, tmp_path)
    with pytest.raises(ValueError, match="--stage adv needs --init"):
        ti.main(argv[:argv.index("--init")] + argv[argv.index("--init") + 2:])
    with pytest.raises(ValueError, match="--init is for --stage adv"):
        ti.main(distill(runs, tmp_path, "--init", str(distilled)))
    with pytest.raises(ValueError, match="distilled with --guidance auto, but --guidance none"):
        ti.main(adv(runs, tmp_path, "--guidance", "none"))
    with pytest.raises(ValueError, match="stage: 'distill' there, 'adv' here"):
        ti.main(adv(runs, distilled))

    ti.main(adv(runs, tmp_path / "unused", "--dry-run"))
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["stage"] == "adv" and cfg["guidance"] == "auto" and cfg["cond_lam"] and cfg["cond_s"]
    assert cfg["lr"] == pytest.approx(ti.learning_rate(1, ti.read_config(distilled)))   # its last step's
    assert (cfg["warmup"], cfg["lr_rampup"], cfg["lr_decay"]) == (0, 0, 0)
    assert cfg["kimg"] == ti.PRESETS["tiny"]["adv_kimg"]


def test_format_duration():
    assert launch.format_duration(0) == "0:00"
    assert launch.format_duration(725.4) == "12:05"
    assert launch.format_duration(3723) == "1:02:03"


def test_distillation_recipe_defaults(tmp_path):
    """p_zero and weighting: the preset's for distill (ImageNet: 0.1 and adaptive; tiny: 0 and none),
    --init's for adv, and a flag always wins."""
    def snapshot(name, argv):
        cfg = ti.parse_config(["--data", "synthetic", *argv])
        torch.save(dict(config=cfg), tmp_path / name)
        return cfg

    for preset, expected in (("S", (0.1, "adaptive")), ("tiny", (0.0, "none"))):
        snapshot(f"teacher-{preset}.pt", ["--preset", preset])
        teacher = ["--stage", "distill", "--teacher", str(tmp_path / f"teacher-{preset}.pt"), "--guidance", "none"]
        ayf = snapshot(f"ayf-{preset}.pt", teacher)
        assert (ayf["p_zero"], ayf["weighting"]) == expected
        flags = ti.parse_config(["--data", "synthetic", *teacher, "--p-zero", "0.3", "--weighting", "none"])
        assert (flags["p_zero"], flags["weighting"]) == (0.3, "none")
    adv = ti.parse_config(["--data", "synthetic", "--stage", "adv", "--teacher", str(tmp_path / "teacher-S.pt"),
                           "--init", str(tmp_path / "ayf-S.pt")])
    assert (adv["p_zero"], adv["weighting"]) == (0.1, "adaptive")


def test_adv_fakes_are_made_at_adv_lam_and_the_distillation_term_keeps_lam_uniform(runs, distilled, tmp_path,
                                                                                  monkeypatch):
    seen = {"fake": [], "distill": []}
    g_objective, distill_objective = ti.rpgan_g_objective, ti.distill_objective
    def g_recording(*args, **cond):
        seen["fake"].append(cond["lam"])
        return g_objective(*args, **cond)
    def distill_recording(*args, **cond):
        seen["distill"].append(cond["lam"])
        return distill_objective(*args, **cond)
    monkeypatch.setattr(ti, "rpgan_g_objective", g_recording)
    monkeypatch.setattr(ti, "distill_objective", distill_recording)
    ti.main(adv(runs, tmp_path / "lam2", *kimg(1), "--adv-lam", "2"))
    assert torch.equal(torch.cat(seen["fake"]), torch.full((B,), 2.0))
    lam = torch.cat(seen["distill"])
    assert lam.min() >= 1 and lam.max() <= 3 and lam.std() > 0.1                 # lam ~ U[1, 3] as distilled
    assert ti.parse_config(adv(runs, tmp_path / "unused"))["adv_lam"] == 1.0      # sample.py's default lam
    with pytest.raises(ValueError, match="--adv-lam 4 lies outside the distilled range"):
        ti.main(adv(runs, tmp_path / "bad", "--adv-lam", "4"))
    with pytest.raises(ValueError, match="--adv-lam is for --stage adv"):
        ti.main(distill(runs, tmp_path / "bad", "--adv-lam", "2"))


def test_adv_goes_on_with_the_distilled_adaptive_weighting(runs, tmp_path):
    """--weighting adaptive: the adv stage starts from the distilled u(t, s) (learning rate 0 keeps it
    as loaded), from the snapshot, or from the training state beside an older snapshot; it is --init's
    weighting by default; without the head anywhere it is a clear error."""
    ti.main(distill(runs, tmp_path / "ayf-w", *kimg(2), "--weighting", "adaptive"))
    distilled_u = state(tmp_path / "ayf-w")["weight"]
    assert max(v.abs().max() for v in distilled_u.values()) > 0             # trained away from u = 0
    assert_same_tensors(torch.load(tmp_path / "ayf-w" / "snapshot.pt")["weight"], distilled_u)
    assert ti.parse_config(adv(runs, tmp_path / "x", init=tmp_path / "ayf-w"))["weighting"] == "adaptive"

    ti.main(adv(runs, tmp_path / "adv", *kimg(1), "--lr", "0", init=tmp_path / "ayf-w"))
    assert_same_tensors(state(tmp_path / "adv")["weight"], distilled_u)

    snapshot = torch.load(tmp_path / "ayf-w" / "snapshot.pt")              # as written before it held the head
    del snapshot["weight"], snapshot["sha256"]                              # (nor a checksum)
    torch.save(snapshot, tmp_path / "ayf-w" / "snapshot.pt")
    ti.main(adv(runs, tmp_path / "adv-old", *kimg(1), "--lr", "0", init=tmp_path / "ayf-w"))
    assert_same_tensors(state(tmp_path / "adv-old")["weight"], distilled_u)

    (tmp_path / "lone").mkdir()
    torch.save(snapshot, tmp_path / "lone" / "snapshot.pt")                # no training state beside it
    with pytest.raises(ValueError, match="holds the weighting head"):
        ti.main(adv(runs, tmp_path / "adv-lone", *kimg(1), init=tmp_path / "lone" / "snapshot.pt"))


def test_divergence_guard_stops_without_overwriting_the_last_good_state(runs, tmp_path, monkeypatch, capsys):
    """When the 1-step jump of the current weights lands more than the data range's width outside it,
    the run stops with a message naming the kept step, and the saved state is that of a straight run
    of that length. Every other test's run passes the same guard with real networks."""
    every_step = ["--snapshot-kimg", str(B / 1000)]
    ti.main(distill(runs, tmp_path / "straight", *kimg(2), *every_step))
    calls, jump_excursion = [], ti.jump_excursion
    def drifting_at_step_2(*args, **kwargs):
        calls.append(1)
        return 5.0 if len(calls) == 3 else jump_excursion(*args, **kwargs)
    monkeypatch.setattr(ti, "jump_excursion", drifting_at_step_2)
    with pytest.raises(SystemExit):
        ti.main(distill(runs, tmp_path / "drift", *kimg(4), *every_step))
    out = capsys.readouterr().out
    assert "step 2: stopped: the 1-step jump f(z, 1, 0) lands 5 (RMS) outside" in out
    assert "keeps the snapshot and training state of step 2" in out
    a, b = state(tmp_path / "straight"), state(tmp_path / "drift")
    assert b["step"] == 2
    for key in ("net", "ema"):
        assert_same_tensors(a[key], b[key])
    assert all(math.isfinite(line["jump_excursion"]) for line in log(tmp_path / "straight"))


def test_the_students_new_branches_train_at_branch_lr_mult(runs, tmp_path):
    """Adam's first step moves a scalar by lr x g / (|g| + eps), about lr x sign(g) (within 1% here, where |g|
    is small): the zero-init gains of the s and lam branches must move by lr x --branch-lr-mult, an
    inherited scalar (out_gain) by lr."""
    lr, mult = 1e-3, 7.0
    ti.main(distill(runs, tmp_path / "ayf", *kimg(1), "--lr", str(lr), "--lr-rampup", "0", "--branch-lr-mult",
                    str(mult), "--guidance", "auto"))
    teacher = torch.load(runs / "teacher" / "snapshot.pt", weights_only=True)["ema"]
    net = state(tmp_path / "ayf")["net"]
    assert net["emb_s_gain"].abs().item() == pytest.approx(lr * mult, rel=1e-2)
    assert net["emb_lam_gain"].abs().item() == pytest.approx(lr * mult, rel=1e-2)
    assert (net["out_gain"] - teacher["out_gain"]).abs().item() == pytest.approx(lr, rel=1e-2)
