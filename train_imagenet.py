"""Train the flow-matching teacher, its weak guide, the AYF flow-map student and its adversarial
finetune on ImageNet 64x64 (docs/method.md §3-7).

    python train_imagenet.py --data /data/imagenet/train --stage teacher --preset S --gpus 8 --out runs/teacher-S
    python train_imagenet.py --data /data/imagenet/train --stage teacher --preset XS --kimg 134218 --gpus 8 \\
                             --out runs/guide-XS                        # 1/8 of the teacher's 2^30 images
    python train_imagenet.py --data /data/imagenet/train --stage distill --loss emd --teacher runs/teacher-S \\
                             --guide runs/guide-XS --gpus 8 --out runs/ayf-S
    python train_imagenet.py --data /data/imagenet/train --stage adv --init runs/ayf-S --teacher runs/teacher-S \\
                             --guide runs/guide-XS --gpus 8 --out runs/ayf-S-adv
    torchrun --nnodes 4 --nproc_per_node 8 ... train_imagenet.py ...      # same script, many machines

The same four on a CPU, about two and a half minutes (the teacher alone: under a minute):

    python train_imagenet.py --data synthetic --preset tiny --device cpu --out runs/teacher-tiny
    python train_imagenet.py --data synthetic --preset tiny --device cpu --kimg 0.5 --out runs/guide-tiny
    python train_imagenet.py --data synthetic --stage distill --teacher runs/teacher-tiny \\
                             --guide runs/guide-tiny --device cpu --out runs/ayf-tiny
    python train_imagenet.py --data synthetic --stage adv --init runs/ayf-tiny --teacher runs/teacher-tiny \\
                             --guide runs/guide-tiny --device cpu --out runs/ayf-tiny-adv

Rerunning the same command resumes where it stopped; rerunning a finished run does nothing. Ctrl-C or
SIGTERM finishes the current step, saves the training state and exits (Ctrl-\\ stops at once).
`--dry-run` prints the resolved configuration; `--bench` (with bench.py's flags instead of these)
times every kind of step side by side.

Stages:
    teacher   flow matching with t logit-normal (EDM's log-normal noise level on the linear path) and
              10% of the labels dropped, so that CFG works. The weak guide of autoguidance is this
              stage with a smaller preset and/or a shorter --kimg.
    distill   AYF-EMD (--loss emd, the default) or AYF-LMD (--loss lmd) from the teacher's EMA into a
              student of the same preset, initialized from it. --guidance auto: the teacher velocity
              is autoguided by --guide with lam ~ U[1, 3] per sample, and lam is a student input;
              cfg: the weak model is the teacher without label; none: the plain teacher.
    adv       adversarial finetuning (AYF Sec. 3.3) of a distilled student (--init, its EMA weights):
              the distillation loss (r = r_max, no warmup) + --adv-weight x RpGAN on 1- and 2-step
              samples, against a discriminator on the frozen teacher's encoder (adversarial.py). The
              fakes are made at --adv-lam (the lam you will sample with), the distillation term keeps
              lam ~ U; with --weighting adaptive (--init's by default) its u(t, s) is --init's.
The EMD / LMD loss values in the log are surrogates (about 1 / (3 R^2)): only their gradients mean
something; follow the gradient norm and the samples instead. --precision bf16 autocasts every
forward, the JVP included; F, dF/dt, v and the EMD / LMD targets stay float32 (the U-Net computes
its time embeddings and preconditioning in float32).

Processes (launch.py): one by default; --gpus N spawns N; torchrun works too (build the dataset cache
first: `python dataset.py SRC`). --batch is the global batch; each process runs at most --batch-gpu
samples at a time and accumulates. 1 process, 8 processes or 8 accumulation rounds take the same
step, up to float summation order: see draw() and the loss scaling in train().

Outputs in --out: config.json (the resolved configuration), log.jsonl (a JSON line per status line),
snapshot.pt {"config", "ema", "step", "weight"} (load_snapshot() needs the first three; weight: the
adaptive weighting head, for --stage adv) and training-state.pt {"config",
"step", "skipped", "net", "ema", "optimizer", "weight", "disc", "disc_optimizer"} (resume; weight:
--weighting adaptive; disc*: --stage adv), plain state_dicts that rank 0 writes atomically every
--snapshot-kimg and at the end, with a sha256 checked on every load; the files before the last save
stay as *-prev.pt, and run.lock holds the folder while a run uses it (checkpoint.py). No RNG state is
saved: every draw is a function of (seed, step), and dropout (M and L teachers only) of (seed, step, rank).
A rerun with other flags or data than the saved config is refused unless --force-resume.
"""
import os

# OpenMP threads that spin while they wait made the tiny run 20x slower on a CPU that other jobs
# share (373 vs 16 sec/kimg measured on 2 cores); sleeping ones cost little. It must be set before
# torch loads its OpenMP runtime; an OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import unet
from adversarial import build_discriminator, rpgan_d_objective, rpgan_g_objective
from checkpoint import (RunLock, UsageError, build_network, check_config, check_disk_space, check_same_run,
                        check_stage, checkpoint_bytes, data_fingerprint, distilled_weighting, img_channels,
                        load_checked, load_snapshot, read_config, resolve_from_checkpoints, save_atomic, save_run,
                        snapshot_file)     # some re-exported: sample.py, evaluate.py and the tests use them
from dataset import DataError, batch_indices, get_batch, load_dataset
from flowmap import as_velocity, guided_velocity, jump_excursion
from launch import (exit_worker, launch, mean_over_ranks, no_sync, peak_memory_gib, rank0_first,
                    setup_process, split_batch, status_line, stop_requests)  # exit_worker: the tests' process-group workers
from losses import AdaptiveWeight, emd_loss, fm_loss, lmd_loss, sample_t_s, tangent_warmup

# Training defaults per model size (the architectures are unet.PRESETS); every value is also a flag.
# XS-L: EDM2's ImageNet-64 teachers (lr, lr decay, dropout, 2^30- or 2^31-image runs at batch 2048,
# a 10 Mimg ramp-up), sCM's distillation length (400k iterations, docs/method.md §5) and AYF's adversarial
# finetune (about 3k iterations, docs/method.md §7); the EMA half-life and the intervals are our choice.
# tiny: the teacher stage takes under a minute on a CPU.
# digits: MNIST at 32x32, the whole chain (digits.py) sized for about 30 min on 2 CPU cores.
# p_zero, weighting: the distillation's s = 0 pairs and (t, s) weighting. ImageNet: 10% s = 0 pairs and
# the adaptive weighting, which lowered the distillation error on the digits (README, 'Ablation on the
# digits') as in the toy; tiny and digits keep the plain recipe their README figures were measured with.
IMAGENET64 = dict(resolution=64, batch=2048, lr_rampup=5000, lr_decay=35000, distill_kimg=819200, adv_kimg=6144,
                  warmup=10000, ema_kimg=10000, precision="bf16", status_kimg=100, snapshot_kimg=5000,
                  p_zero=0.1, weighting="adaptive", branch_lr_mult=1.0)
PRESETS = {
    "tiny": dict(resolution=32, batch=16, lr_rampup=10, lr_decay=50, distill_kimg=0.5, adv_kimg=0.32, warmup=20,
                 ema_kimg=0.5, precision="fp32", status_kimg=0.4, snapshot_kimg=1,
                 lr=0.0100, dropout=0.0, teacher_kimg=2, p_zero=0.0, weighting="none", branch_lr_mult=1.0),
    "digits": dict(resolution=32, batch=32, lr_rampup=20, lr_decay=200, distill_kimg=9.6, adv_kimg=3.2, warmup=20,
                   ema_kimg=2, precision="fp32", status_kimg=1.6, snapshot_kimg=9.6,
                   lr=0.0100, dropout=0.0, teacher_kimg=80, p_zero=0.0, weighting="none", branch_lr_mult=10.0),
    "XS":   dict(IMAGENET64, lr=0.0120, dropout=0.0, teacher_kimg=2**30 / 1e3),
    "S":    dict(IMAGENET64, lr=0.0100, dropout=0.0, teacher_kimg=2**30 / 1e3),
    "M":    dict(IMAGENET64, lr=0.0090, dropout=0.1, teacher_kimg=2**31 / 1e3),
    "L":    dict(IMAGENET64, lr=0.0080, dropout=0.1, teacher_kimg=2**30 / 1e3),
}

# Defaults that depend on the stage. t of the teacher: EDM2's ImageNet-64 log-normal noise levels.
# Distillation: lr = teacher lr x 0.01 (sCM); (t, s) parameters for --ts-dist logitnormal (docs/method.md §5).
# adv: the generator's lr is --init's last one, held constant (parse_config), and r = r_max from step 0.
STAGES = {
    "teacher": dict(lr_scale=1.0,  P_mean=-0.8, P_std=1.6, label_dropout=0.1),
    "distill": dict(lr_scale=0.01, P_mean=-0.8, P_std=1.0, label_dropout=0.0),
    "adv":     dict(lr_scale=None, P_mean=-0.8, P_std=1.0, label_dropout=0.0),
}

ADAM_BETAS = (0.9, 0.99)        # EDM2 and sCM


def parse_config(argv=None):
    """The resolved configuration: the flags, with every default left open filled from PRESETS,
    STAGES, and for distillation from the teacher's snapshot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    # What to train. None: set from the stage, the preset or the teacher (parse_config below).
    add("--data",          required=True,          help="ImageNet train folder, npz batches, MNIST idx files or 'synthetic'")
    add("--stage",         default="teacher",      choices=list(STAGES))
    add("--preset",        default=None,           choices=list(PRESETS), help="model size (S; distill: teacher's)")
    add("--out",           default=None,           help="run folder (runs/<stage>-<preset>)")
    add("--teacher",       default=None,           help="distill, adv: the teacher's run folder or snapshot.pt")
    add("--guide",         default=None,           help="distill, adv, --guidance auto: the weak guide's, likewise")
    add("--init",          default=None,           help="adv: the distilled student's run folder or snapshot.pt")
    add("--loss",          default=None,           choices=["emd", "lmd"], help="distillation objective (emd)")
    add("--guidance",      default=None,           choices=["auto", "cfg", "none"],
                                                   help="of the teacher (distill: auto; adv: --init's)")
    # Length and batch.
    add("--kimg",          default=None,  type=float, help="training length, thousands of images")
    add("--batch",         default=None,  type=int,   help="global batch size")
    add("--batch-gpu",     default=None,  type=int,   help="samples per process and forward; accumulate the rest")
    # Optimization.
    add("--lr",            default=None,  type=float, help="reference learning rate (Adam)")
    add("--lr-rampup",     default=None,  type=int,   help="linear lr ramp-up, iterations")
    add("--lr-decay",      default=None,  type=int,   help="lr / sqrt(step / lr_decay) beyond it (EDM2); 0: off")
    add("--branch-lr-mult", default=None, type=float, help="lr factor of the student's new s, lam branches (preset's)")
    add("--ema-kimg",      default=None,  type=float, help="EMA half-life, kimg")
    add("--ema-rampup",    default=0.05,  type=float, help="half-life at most this fraction of the images seen")
    add("--clip-grad",     default=0.0,   type=float, help="clip the gradient norm to this; 0: off")
    add("--precision",     default=None,  choices=["fp32", "bf16"], help="bf16: autocast the forwards")
    add("--dropout",       default=None,  type=float, help="teacher residual dropout (a student needs 0)")
    # Objective.
    add("--P-mean",        default=None,  type=float, help="logit-normal mean of t (teacher), of t, s (distill)")
    add("--P-std",         default=None,  type=float, help="logit-normal std")
    add("--label-dropout", default=None,  type=float, help="fraction of samples trained without label")
    add("--ts-dist",       default="uniform", choices=["uniform", "logitnormal"], help="(t, s) pairs (sample_t_s)")
    add("--p-diag",        default=0.0,   type=float, help="fraction of s = t pairs")
    add("--p-zero",        default=None,  type=float, help="fraction of s = 0 pairs (preset's; adv: --init's)")
    add("--warmup",        default=None,  type=int,   help="tangent warmup iterations, r: 0 -> r_max")
    add("--r-max",         default=0.99,  type=float, help="final tangent warmup coefficient")
    add("--c",             default=0.1,   type=float, help="tangent normalization constant")
    add("--weighting",     default=None,  choices=["none", "adaptive"],
                                          help="learned weighting of (t, s) (preset's; adv: --init's)")
    add("--lam-min",       default=1.0,   type=float, help="guidance strength lam ~ U[lam_min, lam_max]")
    add("--lam-max",       default=3.0,   type=float)
    add("--jvp",           default="exact", choices=["exact", "fd"], help="forward-mode or finite differences")
    # Adversarial finetuning (--stage adv; docs/method.md §7 and adversarial.py).
    add("--adv-weight",    default=0.01,  type=float, help="weight of the RpGAN generator loss")
    add("--adv-gamma",     default=0.1,   type=float, help="R1 / R2 weight gamma of the discriminator")
    add("--adv-lr",        default=2e-4,  type=float, help="learning rate of the discriminator head (Adam)")
    add("--adv-t-max",     default=0.8,   type=float, help="D sees x_tD = (1 - t_D) x + t_D eps, t_D ~ U[t_min, this]")
    add("--adv-lam",       default=None,  type=float, help="lam of the fakes: the lam you sample with (1, as "
                                                               "sample.py); the distillation term keeps lam ~ U")
    # Data, launch and bookkeeping.
    add("--resolution",    default=None,  type=int)
    add("--cache-dir",     default=None,             help="dataset cache (beside the source)")
    add("--max-images",    default=None,  type=int)
    add("--seed",          default=0,     type=int)
    add("--device",        default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is one")
    add("--gpus",          default=1,     type=int,   help="processes to spawn on this machine")
    add("--status-kimg",   default=None,  type=float, help="a status line every this many kimg")
    add("--snapshot-kimg", default=None,  type=float, help="checkpoints every this many kimg")
    add("--dry-run",       action="store_true",      help="print the resolved configuration and exit")
    add("--force-resume",  action="store_true",      help="resume though flags or data differ (config.json: which)")
    cfg = vars(p.parse_args(argv))

    stage = cfg["stage"]
    if stage != "adv" and cfg["adv_lam"] is not None:
        raise UsageError(f"--adv-lam is for --stage adv, not --stage {stage}")
    teacher_cfg, init_cfg = resolve_from_checkpoints(cfg)       # and the preset, guidance they fix
    preset, defaults = PRESETS[cfg["preset"]], STAGES[stage]
    resolved = dict(
        resolution    = teacher_cfg["resolution"] if teacher_cfg else preset["resolution"],
        kimg          = preset[f"{stage}_kimg"],
        batch         = preset["batch"],
        lr            = preset["lr"] * defaults["lr_scale"] if stage != "adv" else None,
        lr_rampup     = preset["lr_rampup"],
        lr_decay      = preset["lr_decay"],
        ema_kimg      = preset["ema_kimg"],
        precision     = preset["precision"],
        dropout       = preset["dropout"] if stage == "teacher" else 0.0,
        P_mean        = defaults["P_mean"],
        P_std         = defaults["P_std"],
        label_dropout = defaults["label_dropout"],
        warmup        = preset["warmup"],
        status_kimg   = preset["status_kimg"],
        snapshot_kimg = preset["snapshot_kimg"],
        p_zero        = preset["p_zero"] if stage == "distill" else init_cfg["p_zero"] if init_cfg else 0.0,
        weighting     = preset["weighting"] if stage == "distill" else init_cfg["weighting"] if init_cfg else "none",
        branch_lr_mult = preset["branch_lr_mult"] if stage == "distill" else (init_cfg or {}).get("branch_lr_mult", 1),
        out           = f"runs/{stage}-{cfg['preset']}",
    )
    if stage == "adv":      # go on at the learning rate where the distillation ended, constant; r = r_max
        resolved.update(lr=learning_rate(num_steps(init_cfg) - 1, init_cfg), lr_rampup=0, lr_decay=0, warmup=0)
    cfg.update({k: v for k, v in resolved.items() if cfg[k] is None})
    if stage == "adv":
        cfg["adv_lam"] = 1.0 if cfg["adv_lam"] is None else cfg["adv_lam"]
        if cfg["adv_lam"] != 1 and cfg["guidance"] == "none":
            raise UsageError(f"--init {cfg['init']} was distilled without guidance, so it samples only at lam 1; "
                             f"drop --adv-lam {cfg['adv_lam']:g}")
        if not cfg["lam_min"] <= cfg["adv_lam"] <= cfg["lam_max"]:
            raise UsageError(f"--adv-lam {cfg['adv_lam']:g} lies outside the distilled range [{cfg['lam_min']:g}, "
                             f"{cfg['lam_max']:g}] (--lam-min, --lam-max)")
    check_config(cfg)
    cfg["cond_s"] = stage != "teacher"                                  # the student embeds s ...
    cfg["cond_lam"] = cfg["guidance"] in ("auto", "cfg")                # ... and lam, when guided
    return cfg


# ----------------------------------------------------------------------------------------------
# Schedules and small helpers.

def num_steps(cfg):
    """Training iterations: --kimg thousand images at the global batch size."""
    return math.ceil(cfg["kimg"] * 1000 / cfg["batch"])


def learning_rate(step, cfg):
    """EDM2's inverse square root decay with a linear ramp-up (t_ref = lr_decay, in iterations):
    lr = lr_ref / sqrt(max(step / t_ref, 1)) * min((step + 1) / rampup, 1)."""
    lr = cfg["lr"]
    if cfg["lr_decay"] > 0:
        lr /= math.sqrt(max(step / cfg["lr_decay"], 1.0))
    if cfg["lr_rampup"] > 0:
        lr *= min((step + 1) / cfg["lr_rampup"], 1.0)
    return lr


def param_groups(net, weight, branch_lr_mult):
    """Adam's groups with their lr factors: the student's new s and lam branches (unet.STUDENT_ONLY) start at
    gain 0 and get branch_lr_mult, since at a distillation's lr (1% of the teacher's) a zero gain moves at most
    lr per step, too little in a short run (README, digits); the rest, and the weighting head, 1."""
    branch = [p for name, p in net.named_parameters() if name.startswith(unet.STUDENT_ONLY)]
    rest = [p for name, p in net.named_parameters() if not name.startswith(unet.STUDENT_ONLY)]
    rest += list(weight.parameters()) if weight else []
    return [dict(params=rest, lr_mult=1.0), dict(params=branch, lr_mult=branch_lr_mult)]


def ema_beta(nimg, batch, cfg):
    """EMA decay per step for a half-life of ema_kimg, capped at ema_rampup x the images seen (EDM):
    beta = 0.5 ** (batch / half-life), so the average forgets half of itself every half-life."""
    half_life = min(cfg["ema_kimg"] * 1000, cfg["ema_rampup"] * nimg)
    return 0.5 ** (batch / max(half_life, 1e-8))


def seed_of(*keys):
    """A 64-bit seed hashed from integers (numpy's SeedSequence), e.g. (seed, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def unconditional(velocity):
    """CFG's weak model: the same velocity with the label dropped."""
    return lambda x, t, label=None: velocity(x, t)


# ----------------------------------------------------------------------------------------------
# A step's pieces: its random draws, and the objectives, per sample (b,), of one micro-batch whose
# rows of the draws are d. teacher: losses.fm_loss; distill: distill_objective; adv: distill_objective
# + adversarial.rpgan_g_objective for the generator, adversarial.rpgan_d_objective for D.

def draw(cfg, step, B, device):
    """Every random draw of a step, for the whole global batch, from a generator seeded by (seed, step):
    the same on every rank, which keeps its own rows, whatever the world size. Data indices: dataset.py;
    residual dropout masks (M and L teachers): seeded by (seed, step, rank). Each (B,) or (B, C, R, R)."""
    gen, stage = torch.Generator(device).manual_seed(seed_of(cfg["seed"], step)), cfg["stage"]
    C, R = cfg["img_channels"], cfg["resolution"]
    randn = functools.partial(torch.randn, generator=gen, device=device)
    rand = functools.partial(torch.rand, generator=gen, device=device)
    d = dict(eps=randn(B, C, R, R))
    if stage == "teacher":                                          # logit(t) = ln sigma ~ N(P_mean, P_std^2)
        d["t"] = d["s"] = torch.sigmoid(cfg["P_mean"] + cfg["P_std"] * randn(B))
    else:                                                           # t_max >= t >= s >= t_min, or s = 0
        d["t"], d["s"] = sample_t_s(B, cfg["ts_dist"], cfg["P_mean"], cfg["P_std"], cfg["p_diag"], cfg["p_zero"],
                                    generator=gen, device=device, t_min=cfg["t_min"], t_max=cfg["t_max"])
    d["lam"] = cfg["lam_min"] + (cfg["lam_max"] - cfg["lam_min"]) * rand(B)
    d["keep"] = rand(B) >= cfg["label_dropout"]                     # label dropout
    if stage == "adv":                                              # fakes' noise and jumps, D's noise level
        d["z"] = randn(B, C, R, R)
        d["u"] = torch.where(rand(B) < 0.5, 1.0, 0.5)               # 1: one step, 0.5: two
        d["t_D"] = cfg["t_min"] + (cfg["adv_t_max"] - cfg["t_min"]) * rand(B)    # in the teacher's range
        d["eps_D"] = randn(B, C, R, R)
    return d


def divergence_probe(cfg, num_classes, device, n=4):
    """The divergence guard's fixed inputs, the same on every rank: noise (n, C, R, R) and its cond
    (labels 0, 1, ..., lam alternating lam_min and lam_max for a student with a lam input)."""
    gen = torch.Generator(device).manual_seed(seed_of(cfg["seed"], 2**32 - 1))
    z = torch.randn(n, cfg["img_channels"], cfg["resolution"], cfg["resolution"], generator=gen, device=device)
    cond = dict(label=torch.eye(num_classes, device=device)[torch.arange(n, device=device) % num_classes])
    if cfg["cond_lam"]:
        cond["lam"] = torch.tensor([cfg["lam_min"], cfg["lam_max"]] * (n // 2), device=device)
    return z, cond


def teacher_velocity(teacher, guide, guidance):
    """The velocity the student distills (docs/method.md §6): autoguided by the weak guide, CFG's (the
    weak model is the teacher without label), or the plain teacher's (guidance none)."""
    if guidance == "auto":
        return functools.partial(guided_velocity, as_velocity(teacher), as_velocity(guide))
    if guidance == "cfg":
        return functools.partial(guided_velocity, as_velocity(teacher), unconditional(as_velocity(teacher)))
    return as_velocity(teacher)


def distill_objective(net, velocity, x0, d, r, cfg, **cond):
    """AYF-EMD (docs/method.md §3) with tangent warmup r, or AYF-LMD (§4), of the student F at
    x_t = (1 - t) x0 + t eps against the teacher velocity v (guided: v_weak + lam (v - v_weak), §6)."""
    x_t = torch.lerp(x0, d["eps"], d["t"][:, None, None, None])            # (b, C, R, R)
    if cfg["loss"] == "emd":
        return emd_loss(net, velocity, x_t, d["t"], d["s"], r=r, c=cfg["c"], jvp_method=cfg["jvp"], **cond)
    return lmd_loss(net, velocity, x_t, d["t"], d["s"], c=cfg["c"], jvp_method=cfg["jvp"],
                    data_range=(-1.0, 1.0), **cond)                     # teacher's x0 at f^- kept in range


# ----------------------------------------------------------------------------------------------
# Training.

def train(cfg, rank=0, local_rank=0, world_size=1):
    """One process of a training run; the sections below are the whole algorithm."""
    out = Path(cfg["out"])
    stage, B = cfg["stage"], cfg["batch"]
    cfg["device"], device = setup_process(cfg["device"], rank, local_rank, world_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Batch split: global batch B = world_size x rounds x batch_gpu.
    micro_batches = split_batch(B, cfg["batch_gpu"], rank, world_size)      # this rank's rows, a slice per round
    rounds, batch_gpu = len(micro_batches), micro_batches[0].stop - micro_batches[0].start

    # Setup data.
    with rank0_first(rank, world_size):                             # rank 0 builds a missing cache
        ds = load_dataset(cfg["data"], cache_dir=cfg["cache_dir"], resolution=cfg["resolution"],
                          max_images=cfg["max_images"])
    cfg["num_classes"], cfg["data_sha"] = ds.num_classes, data_fingerprint(ds.images)
    cfg["img_channels"] = ds.channels                               # 1 for gray idx digits, 3 (RGB) otherwise

    # Setup networks.
    torch.manual_seed(cfg["seed"])
    net = build_network(cfg).to(device).train()
    if stage != "teacher":
        teacher, teacher_cfg = load_snapshot(cfg["teacher"], device)        # EMA weights, frozen, eval mode
        if teacher_cfg["num_classes"] != ds.num_classes:
            raise UsageError(f"--teacher {cfg['teacher']} has {teacher_cfg['num_classes']} classes, "
                             f"--data {cfg['data']} has {ds.num_classes}")
        if img_channels(teacher_cfg) != ds.channels:
            raise UsageError(f"--teacher {cfg['teacher']} was trained on {img_channels(teacher_cfg)}-channel images, "
                             f"--data {cfg['data']} has {ds.channels} channels; train the teacher on this data")
        if stage == "distill":
            unet.init_student_from_teacher(net, teacher.state_dict())
        else:                                                       # adv: finetune the distilled EMA
            net.load_state_dict(load_snapshot(cfg["init"], device)[0].state_dict())
        guide = load_snapshot(cfg["guide"], device)[0] if cfg["guidance"] == "auto" else None
        velocity = teacher_velocity(teacher, guide, cfg["guidance"])
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    weight = AdaptiveWeight().to(device) if cfg["weighting"] == "adaptive" else None
    if weight and stage == "adv" and read_config(cfg["init"])["weighting"] == "adaptive":
        weight.load_state_dict(distilled_weighting(cfg["init"], device))   # u(t, s) as the distillation left it
    params = list(net.parameters()) + (list(weight.parameters()) if weight else [])
    optimizer = torch.optim.Adam(param_groups(net, weight, cfg["branch_lr_mult"]), lr=cfg["lr"], betas=ADAM_BETAS)
    head = optimizer_D = None
    if stage == "adv":                                              # the same initial head on every rank
        D, head, optimizer_D = build_discriminator(teacher, cfg["preset"], ds.num_classes, cfg["adv_lr"], device)

    # Resume.
    step = skipped = 0
    state_path = out / "training-state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)   # main() checked it and its flags
        check_same_run(state, cfg, state_path, keys=("num_classes", "img_channels", "data_sha"))   # and its data
        for key, part in dict(net=net, ema=ema, optimizer=optimizer, weight=weight, disc=head,
                              disc_optimizer=optimizer_D).items():
            if part is not None:                                    # weight: --weighting adaptive; disc*: adv
                part.load_state_dict(state[key])
        step, skipped = state["step"], state["skipped"]
        del state
    total_steps = num_steps(cfg)
    status_every = max(1, round(cfg["status_kimg"] * 1000 / B))
    snapshot_every = max(1, round(cfg["snapshot_kimg"] * 1000 / B))
    saved_step = step if state_path.exists() else None             # of the checkpoints on disk
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_disk_space(out, checkpoint_bytes(net, weight, head))
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        print(json.dumps(cfg, indent=2))
        print(f"{stage}: {unet.num_params(net) / 1e6:.2f} M parameters, {len(ds)} images of {ds.num_classes} "
              f"classes, {world_size} process(es) on {device}, batch {B} = {world_size} x {rounds} x "
              f"{batch_gpu}, step {step} of {total_steps}" + (" (resumed)" if step else ""))
    device_ids = [device] if device.type == "cuda" else None
    ddp = net if world_size == 1 else DistributedDataParallel(net, device_ids=device_ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")

    guard_z, guard_cond = divergence_probe(cfg, ds.num_classes, device)

    # Main training loop.
    sums = torch.zeros(5, device=device)            # over the finite steps: loss, adv: G adv, D loss, D gap, R1 + R2
    grad_norm_sum = torch.zeros([], device=device)
    finite_steps = steps_since = 0
    tick, stop = time.time(), False
    with stop_requests(rank) as stop_requested:
        while step < total_steps and not stop:
            # Randomness of the whole global batch from (seed, step), identical on every rank.
            idx = batch_indices(step, B, len(ds), cfg["seed"])      # (B,) dataset indices
            draws = draw(cfg, step, B, device)                      # eps, t, s, lam, keep (adv: z, u, t_D, eps_D)
            if cfg["dropout"]:
                torch.manual_seed(seed_of(cfg["seed"], step, rank))  # residual dropout masks
            r = tangent_warmup(step, cfg["warmup"], cfg["r_max"])
            lr = learning_rate(step, cfg)

            # Forward and backward, one micro-batch at a time; DDP all-reduces in the last backward.
            optimizer.zero_grad(set_to_none=True)
            step_sums = torch.zeros(5, device=device)               # per-sample sums, as sums
            pairs = []                                              # adv: (real, fake, D's inputs)
            for a, rows in enumerate(micro_batches):
                d = {k: v[rows] for k, v in draws.items()}          # this micro-batch's rows of each draw
                x0, label = get_batch(ds, idx[rows], device)        # (b, C, R, R) in [-1, 1], (b, K)
                label = label * d["keep"][:, None]
                cond = dict(label=label, lam=d["lam"]) if cfg["cond_lam"] else dict(label=label)
                with no_sync(ddp, accumulating=a < rounds - 1):
                    with autocast:
                        if stage == "teacher":                      # flow matching, ||F(x_t, t, t) - (eps - x0)||^2
                            loss = fm_loss(ddp, x0, d["eps"], d["t"], label=label)           # (b,)
                        else:
                            loss = distill_objective(ddp, velocity, x0, d, r, cfg, **cond)   # (b,)
                        objective = weight(loss, d["t"], d["s"]) if weight else loss       # exp(-u) L + u
                        if stage == "adv":                          # + w RpGAN, through the student's jumps
                            d_cond = dict(t=d["t_D"], eps=d["eps_D"], label=label)
                            fake_cond = dict(cond, lam=torch.full_like(d["lam"], cfg["adv_lam"])) \
                                if cfg["cond_lam"] else cond            # fakes at the sampling lam (adversarial.py)
                            g_adv, fake = rpgan_g_objective(ddp, D, x0, d["z"], d["u"], d_cond, cfg["t_max"],
                                                            **fake_cond)
                            objective = objective + cfg["adv_weight"] * g_adv
                            step_sums[1] += g_adv.detach().sum()
                            pairs.append((x0, fake.detach(), d_cond))
                    # sum / B per micro-batch, times world_size against DDP's mean: the global-batch mean.
                    (objective.sum() * (world_size / B)).backward()
                step_sums[0] += loss.detach().sum()
            if weight:                                              # the tiny weighting head is not under DDP
                mean_over_ranks(weight.parameters(), world_size)

            # Discriminator (adv): RpGAN + gamma/2 (R1 + R2) on the generator step's pairs, against the same D.
            if stage == "adv":
                optimizer_D.zero_grad(set_to_none=True)             # drop what the generator loss left there
                for x0, fake, d_cond in pairs:
                    with autocast:
                        d_obj, *parts = rpgan_d_objective(D, x0, fake, cfg["adv_gamma"], **d_cond)   # (b,) each
                    (d_obj.sum() * (world_size / B)).backward()
                    step_sums[2:] += torch.stack([part.sum() for part in parts])
                mean_over_ranks(head.parameters(), world_size)

            # NaN guard: if any loss or gradient is not finite, every rank skips the update (of both nets).
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            finite = torch.isfinite(grad_norm) & torch.isfinite(step_sums).all()
            if head:
                finite &= torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in head.parameters()]))
            # Divergence guard on F's magnitude, which the normalized losses cannot show: the current
            # weights' 1-step jump f(z, 1, 0) = z - F(z, 1, 0) (from t_max) must land near [-1, 1]
            # (the exact map's lands in it). Beyond a whole range width (2, RMS) F is drifting away. The
            # teacher's flow-matching loss is not normalized, so it shows divergence itself (the probe: 7% of its step).
            excursion = 0.0 if stage == "teacher" else jump_excursion(net, guard_z, (-1.0, 1.0), cfg["t_max"], **guard_cond)
            flags = torch.tensor([not bool(finite), bool(stop_requested), excursion], device=device).float()
            if world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            nonfinite, stop, excursion = flags.tolist()
            if excursion > 2 or not math.isfinite(excursion):
                if rank == 0:
                    kept = (f"{out} keeps the snapshot and training state of step {saved_step}"
                            if saved_step is not None else "nothing was saved yet")
                    print(f"step {step}: stopped: the 1-step jump f(z, 1, 0) lands {excursion:.3g} (RMS) outside "
                          f"the data range [-1, 1], more than its width 2: F is diverging (README, 'LMD "
                          f"divergence'). Not saved; {kept}. Rerun from there with a lower --lr or --loss emd.")
                raise SystemExit(1)
            if nonfinite:
                skipped += 1
                if rank == 0:
                    print(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
            else:                                                   # optimizer and EMA
                if cfg["clip_grad"] > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg["clip_grad"], grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_mult"]
                optimizer.step()
                net.normalize_weights_()                            # EDM2 forced weight normalization
                beta = ema_beta((step + 1) * B, B, cfg)
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)
                if head:
                    optimizer_D.step()
                sums += step_sums
                grad_norm_sum += grad_norm
                finite_steps += 1
            step += 1
            steps_since += 1
            done = step == total_steps or stop

            # Status line.
            if step % status_every == 0 or done:
                if world_size > 1:
                    dist.all_reduce(sums)
                n = max(finite_steps * B, 1)                        # per-sample means; ln 2 = 0.69 at a draw
                stats = dict(kimg=step * B / 1000, step=step, loss=sums[0].item() / n, lr=lr, r=r,
                             grad_norm=grad_norm_sum.item() / max(finite_steps, 1),
                             sec_per_kimg=(time.time() - tick) / (steps_since * B / 1000),
                             eta_sec=(time.time() - tick) / steps_since * (total_steps - step),
                             mem_gib=peak_memory_gib(device), skipped=skipped, jump_excursion=excursion)
                if stage == "adv":
                    stats.update(zip(("g_adv", "d_loss", "d_real_minus_fake", "r1_r2"), (sums[1:] / n).tolist()))
                if rank == 0:
                    print(status_line(stats, stage, cfg["loss"]), flush=True)
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(stats) + "\n")
                sums.zero_()
                grad_norm_sum.zero_()
                finite_steps = steps_since = 0
                tick = time.time()

            # Save snapshot and training state: rank 0 writes both (every rank holds the same weights).
            if step % snapshot_every == 0 or done:
                if rank == 0:
                    save_run(out, cfg, step, skipped, saved_step, net=net, ema=ema, optimizer=optimizer,
                             weight=weight, disc=head, disc_optimizer=optimizer_D)
                saved_step = step
    if rank == 0:
        print(f"{'stopped' if stop else 'finished'} at step {step}: {out / 'training-state.pt'}")
    if world_size > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Launch (launch.py).

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bench" in argv:                                           # the step-cost benchmark: bench.py's flags
        import bench
        argv.remove("--bench")
        return bench.main(argv)
    cfg = parse_config(argv)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if cfg["dry_run"]:
        if rank0:
            print(json.dumps(cfg, indent=2))
        return
    out = Path(cfg["out"])
    state_path = out / "training-state.pt"
    with RunLock(out) if rank0 else contextlib.nullcontext():     # one run per --out
        if state_path.exists():                                     # before any work: whole, the same run, done?
            state = load_checked(state_path, keys=("config", "step", "net", "ema", "optimizer"))
            check_same_run(state, cfg, state_path)
            if state["step"] >= num_steps(cfg):
                if rank0:
                    print(f"{cfg['out']} is finished ({state['step']} steps); nothing to do")
                return
        for tmp in out.glob("*.tmp") if rank0 else ():              # a killed save's; the lock says no one writes
            print(f"note: removing {tmp}, left by an interrupted save")
            tmp.unlink()

        def build_cache():                                          # once, before --gpus spawns its processes
            if str(cfg["data"]) != "synthetic":
                load_dataset(cfg["data"], cache_dir=cfg["cache_dir"], resolution=cfg["resolution"])
        launch(train, cfg, cfg["gpus"], cfg["device"], before_spawn=build_cache,
               user_errors=(DataError, UsageError))


if __name__ == "__main__":
    try:
        main()
    except (DataError, UsageError) as error:                        # a user's mistake: one line, exit code 2
        print(f"train_imagenet.py: error: {error}", file=sys.stderr)
        sys.exit(2)
