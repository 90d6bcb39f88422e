"""Train the flow-matching teacher, its weak guide, the AYF flow-map student and its adversarial
finetune on ImageNet 64x64.

    python train_imagenet.py --data /data/imagenet/train --stage teacher --preset S --gpus 8 --out runs/teacher-S
    python train_imagenet.py --data /data/imagenet/train --stage teacher --preset XS --kimg 134218 --gpus 8 \\
                             --out runs/guide-XS                        # 1/8 of the teacher's 2^30 images
    python train_imagenet.py --data /data/imagenet/train --stage distill --loss emd --teacher runs/teacher-S \\
                             --guide runs/guide-XS --gpus 8 --out runs/ayf-S
    python train_imagenet.py --data /data/imagenet/train --stage adv --init runs/ayf-S --teacher runs/teacher-S \\
                             --guide runs/guide-XS --gpus 8 --out runs/ayf-S-adv
    torchrun --nnodes 4 --nproc_per_node 8 ... train_imagenet.py ...      # same script, many machines
    python train_imagenet.py --data synthetic --preset tiny --device cpu   # under a minute, no GPU

Rerunning the same command resumes where it stopped; rerunning a finished run does nothing. Ctrl-C or
SIGTERM finishes the current step, saves the training state and exits (Ctrl-\\ stops at once).
`--dry-run` prints the resolved configuration; `--bench` (with bench.py's flags instead of these)
times every kind of step side by side. The whole pipeline on a CPU, about two and a half minutes:

    python train_imagenet.py --data synthetic --preset tiny --device cpu --out runs/teacher-tiny
    python train_imagenet.py --data synthetic --preset tiny --device cpu --kimg 0.5 --out runs/guide-tiny
    python train_imagenet.py --data synthetic --stage distill --teacher runs/teacher-tiny \\
                             --guide runs/guide-tiny --device cpu --out runs/ayf-tiny
    python train_imagenet.py --data synthetic --stage adv --init runs/ayf-tiny --teacher runs/teacher-tiny \\
                             --guide runs/guide-tiny --device cpu --out runs/ayf-tiny-adv

Stages (docs/method.md §3-7):
    teacher   flow matching, ||F(x_t, t, t) - (eps - x0)||^2 with t logit-normal (EDM's log-normal
              noise level on the linear path) and 10% of the labels dropped, so that CFG works. The
              weak guide of autoguidance is this stage with a smaller preset and/or a shorter --kimg.
    distill   AYF-EMD (--loss emd, the default) or AYF-LMD (--loss lmd) from the teacher's EMA into a
              student of the same preset, initialized from it. --guidance auto: the teacher velocity
              is autoguided by --guide with lam ~ U[1, 3] per sample, and lam is a student input;
              cfg: the weak model is the teacher without label; none: the plain teacher.
    adv       adversarial finetuning (AYF Sec. 3.3) of a distilled student (--init, its EMA weights):
              generator loss = the distillation loss (r = r_max, no warmup) + --adv-weight x the RpGAN
              generator loss of 1- and 2-step samples from noise, each paired with the real image of
              the same label from the batch. Discriminator = the frozen teacher's encoder (its EMA)
              at a noise level t_D ~ U[0, --adv-t-max] + a small trainable head (DiscriminatorHead),
              trained with RpGAN + gamma/2 (R1 + R2). Choices: the section 'Adversarial finetuning'.
The EMD / LMD loss values in the log are surrogates (about 1 / (3 R^2)): only their gradients mean
something; follow the gradient norm and the samples instead.

Precision: --precision bf16 autocasts every forward, the JVP included. The U-Net computes its time
embeddings and preconditioning in float32, so F, dF/dt and v come out in float32 and the EMD / LMD
targets are formed in float32.

Launch: a single process by default (no process group; CUDA if there is one); `--gpus N` spawns N
processes (NCCL, or gloo with --device cpu); under torchrun the processes are found from RANK,
WORLD_SIZE and LOCAL_RANK (build the dataset cache first there: `python dataset.py SRC`). --batch is
the global batch; each process runs at most --batch-gpu samples at a time and accumulates.

World-size independence: every random draw of step k (data indices, eps, t, s, lam, label dropout;
adv: the fakes' noise and jumps, D's noise levels and noise) is made for the whole global batch from
a generator seeded by (seed, k), the same on every rank, and each process keeps its own rows. Each
micro-batch's loss is summed and scaled by world_size / batch, so after DDP's mean over ranks (or the
manual all-reduce of the small heads) the gradient is the mean over the global batch: 1 process, 8
processes or 8 accumulation rounds take the same step, up to float summation order.

Outputs in --out:
    config.json          the resolved configuration
    log.jsonl            one JSON line per status interval (the status line printed by rank 0)
    snapshot.pt          {"config", "ema", "step"}: the EMA weights and all that load_snapshot() needs
    training-state.pt    {"config", "step", "skipped", "net", "ema", "optimizer", "weight", "disc",
                         "disc_optimizer"}: resume (weight: --weighting adaptive; disc*: --stage adv)
Both are plain state_dicts, written atomically by rank 0 every --snapshot-kimg and at the end. No
RNG state is saved: every draw is a function of (seed, step), and dropout (M and L teachers only)
of (seed, step, rank).
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
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import unet
from dataset import batch_indices, get_batch, load_dataset
from flowmap import as_velocity, bcast, flow_map, guided_velocity
from losses import (AdaptiveWeight, emd_loss, fm_loss, grad_penalty, lmd_loss, rpgan_d_loss, rpgan_g_loss,
                    sample_t_s, tangent_warmup)

# Training defaults per model size (the architectures are unet.PRESETS); every value is also a flag.
# XS-L: EDM2's ImageNet-64 teachers (lr, lr decay, dropout, 2^30- or 2^31-image runs at batch 2048,
# a 10 Mimg ramp-up), sCM's distillation length (400k iterations, docs/method.md §5) and AYF's adversarial
# finetune (about 3k iterations, docs/method.md §7); the EMA half-life and the intervals are our choice.
# tiny: the teacher stage takes under a minute on a CPU.
IMAGENET64 = dict(resolution=64, batch=2048, lr_rampup=5000, lr_decay=35000, distill_kimg=819200, adv_kimg=6144,
                  warmup=10000, ema_kimg=10000, precision="bf16", status_kimg=100, snapshot_kimg=5000)
PRESETS = {
    "tiny": dict(resolution=32, batch=16, lr_rampup=10, lr_decay=50, distill_kimg=0.5, adv_kimg=0.32, warmup=20,
                 ema_kimg=0.5, precision="fp32", status_kimg=0.4, snapshot_kimg=1,
                 lr=0.0100, dropout=0.0, teacher_kimg=2),
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

# Keys that must agree between a run and the training state it resumes from.
SAME_RUN = ("stage", "preset", "resolution", "batch", "loss", "guidance", "weighting")

ADAM_BETAS = (0.9, 0.99)        # EDM2 and sCM
ADV_BETAS = (0.0, 0.99)         # the discriminator head's Adam (R3GAN)


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
    add("--p-zero",        default=0.0,   type=float, help="fraction of s = 0 pairs")
    add("--warmup",        default=None,  type=int,   help="tangent warmup iterations, r: 0 -> r_max")
    add("--r-max",         default=0.99,  type=float, help="final tangent warmup coefficient")
    add("--c",             default=0.1,   type=float, help="tangent normalization constant")
    add("--weighting",     default="none", choices=["none", "adaptive"], help="learned weighting of (t, s)")
    add("--lam-min",       default=1.0,   type=float, help="guidance strength lam ~ U[lam_min, lam_max]")
    add("--lam-max",       default=3.0,   type=float)
    add("--jvp",           default="exact", choices=["exact", "fd"], help="forward-mode or finite differences")
    # Adversarial finetuning (--stage adv; docs/method.md §7 and the section 'Adversarial finetuning').
    add("--adv-weight",    default=0.01,  type=float, help="weight of the RpGAN generator loss")
    add("--adv-gamma",     default=0.1,   type=float, help="R1 / R2 weight gamma of the discriminator")
    add("--adv-lr",        default=2e-4,  type=float, help="learning rate of the discriminator head (Adam)")
    add("--adv-t-max",     default=0.8,   type=float, help="D sees x_tD = (1 - t_D) x + t_D eps, t_D ~ U[0, this]")
    # Data, launch and bookkeeping.
    add("--resolution",    default=None,  type=int)
    add("--cache-dir",     default=None,             help="dataset cache (beside the source)")
    add("--max-images",    default=None,  type=int)
    add("--seed",          default=0,     type=int)
    add("--device",        default="auto",           help="auto (cuda if available), cuda or cpu")
    add("--gpus",          default=1,     type=int,   help="processes to spawn on this machine")
    add("--status-kimg",   default=None,  type=float, help="a status line every this many kimg")
    add("--snapshot-kimg", default=None,  type=float, help="checkpoints every this many kimg")
    add("--dry-run",       action="store_true",      help="print the resolved configuration and exit")
    cfg = vars(p.parse_args(argv))

    stage = cfg["stage"]
    teacher_cfg = init_cfg = None
    if stage != "adv" and cfg["init"] is not None:
        raise ValueError(f"--init is for --stage adv, not --stage {stage}")
    if stage == "teacher":
        for flag in ("teacher", "guide", "loss", "guidance"):
            if cfg[flag] is not None:
                raise ValueError(f"--{flag} is for --stage distill and adv, not --stage teacher")
        cfg.update(loss="fm", guidance=None, preset=cfg["preset"] or "S")
    else:
        if cfg["teacher"] is None:
            raise ValueError(f"--stage {stage} needs --teacher (a teacher run folder or its snapshot.pt)")
        if stage == "adv":
            if cfg["init"] is None:
                raise ValueError("--stage adv needs --init (a distill run folder or its snapshot.pt)")
            init_cfg = read_config(cfg["init"])
            check_stage(init_cfg, "distill", f"--init {cfg['init']}")
            if cfg["guidance"] not in (None, init_cfg["guidance"]):     # it decides the lam input
                raise ValueError(f"--init {cfg['init']} was distilled with --guidance {init_cfg['guidance']}, "
                                 f"but --guidance {cfg['guidance']} was given")
            cfg["guidance"] = init_cfg["guidance"]
        cfg.update(loss=cfg["loss"] or "emd", guidance=cfg["guidance"] or "auto")
        if (cfg["guidance"] == "auto") != (cfg["guide"] is not None):
            raise ValueError("--guidance auto needs --guide, and --guide is only used by --guidance auto")
        teacher_cfg = read_config(cfg["teacher"])
        check_stage(teacher_cfg, "teacher", f"--teacher {cfg['teacher']}")
        if cfg["preset"] not in (None, teacher_cfg["preset"]):
            raise ValueError(f"the student has the teacher's preset: --teacher {cfg['teacher']} is preset "
                             f"{teacher_cfg['preset']!r}, but --preset {cfg['preset']!r} was given")
        if cfg["resolution"] not in (None, teacher_cfg["resolution"]):
            raise ValueError(f"--teacher {cfg['teacher']} has resolution {teacher_cfg['resolution']}, "
                             f"but --resolution {cfg['resolution']} was given")
        if cfg["guidance"] == "cfg" and teacher_cfg["label_dropout"] == 0:
            raise ValueError(f"--guidance cfg needs a teacher trained with label dropout; --teacher "
                             f"{cfg['teacher']} was trained with --label-dropout 0")
        if cfg["dropout"]:
            raise ValueError("a distilled student must have --dropout 0 (a finite-difference JVP and the "
                             "trainable forward would draw different masks)")
        if init_cfg and (init_cfg["preset"], init_cfg["resolution"]) != (teacher_cfg["preset"],
                                                                           teacher_cfg["resolution"]):
            raise ValueError(f"--init {cfg['init']} is preset {init_cfg['preset']!r} at {init_cfg['resolution']}, "
                             f"--teacher {cfg['teacher']} {teacher_cfg['preset']!r} at {teacher_cfg['resolution']}")
        cfg["preset"] = teacher_cfg["preset"]
    if cfg["guide"] is not None:
        guide_cfg = read_config(cfg["guide"])
        check_stage(guide_cfg, "teacher", f"--guide {cfg['guide']}")
        if guide_cfg["resolution"] != teacher_cfg["resolution"]:
            raise ValueError(f"--guide {cfg['guide']} has resolution {guide_cfg['resolution']}, "
                             f"--teacher {cfg['teacher']} {teacher_cfg['resolution']}")

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
        out           = f"runs/{stage}-{cfg['preset']}",
    )
    if stage == "adv":      # go on at the learning rate where the distillation ended, constant; r = r_max
        resolved.update(lr=learning_rate(num_steps(init_cfg) - 1, init_cfg), lr_rampup=0, lr_decay=0, warmup=0)
    cfg.update({k: v for k, v in resolved.items() if cfg[k] is None})
    if stage != "teacher" and cfg["jvp"] == "fd" and cfg["precision"] == "bf16":
        raise ValueError("--jvp fd with --precision bf16: the central difference divides bf16 rounding "
                         "by 2h (relative gradient error 0.9 measured by bench.py); use --precision fp32 "
                         "or --jvp exact")
    cfg["cond_s"] = stage != "teacher"                                  # the student embeds s ...
    cfg["cond_lam"] = cfg["guidance"] in ("auto", "cfg")                # ... and lam, when guided
    return cfg


# ----------------------------------------------------------------------------------------------
# Checkpoints.

def snapshot_file(path):
    """A run folder or a snapshot file -> the snapshot file."""
    path = Path(path)
    return path / "snapshot.pt" if path.is_dir() else path


def read_config(path):
    """The config stored in a snapshot or training state, without reading its tensors."""
    path = snapshot_file(path)
    if not path.exists():
        raise FileNotFoundError(f"no snapshot at {path}")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]


def check_stage(config, stage, what):
    if config["stage"] != stage:
        raise ValueError(f"{what} was written by --stage {config['stage']} (preset {config['preset']}), "
                         f"but a --stage {stage} checkpoint is needed here")


def check_same_run(saved, cfg, path):
    """Resuming from a training state of another run is an error that names both."""
    differ = [f"{k}: {saved.get(k)!r} there, {cfg[k]!r} here" for k in SAME_RUN if saved.get(k) != cfg[k]]
    if differ:
        raise ValueError(f"{path} belongs to another run ({'; '.join(differ)}). "
                         f"Use another --out, or delete it to start over.")


def build_network(config):
    """The U-Net that a config describes (the preset's architecture, resolution, classes, inputs)."""
    return unet.UNet(img_resolution=config["resolution"], num_classes=config["num_classes"],
                     cond_s=config["cond_s"], cond_lam=config["cond_lam"], dropout=config["dropout"],
                     **unet.PRESETS[config["preset"]])


def load_snapshot(path, device="cpu"):
    """(network with the EMA weights in eval mode, config) from a run folder or snapshot.pt."""
    data = torch.load(snapshot_file(path), map_location=device, weights_only=True)
    net = build_network(data["config"]).to(device)
    net.load_state_dict(data["ema"])
    return net.eval().requires_grad_(False), data["config"]


def save_atomic(obj, path):
    """torch.save through a temporary file, so that an interrupted save leaves the old file intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def no_sync(net, accumulating):
    """DDP's no_sync while accumulating: only the last micro-batch's backward all-reduces."""
    if accumulating and isinstance(net, DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def stop_requests(rank):
    """Ctrl-C and SIGTERM append to the yielded list instead of stopping the process, so that the
    loop can finish its step and save; the loop all-reduces the request, so all ranks stop together."""
    received = []

    def request_stop(signum, frame):
        if not received and rank == 0:
            print(f"{signal.Signals(signum).name}: saving the training state after this step")
        received.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def peak_memory_gib(device):
    """Peak CUDA memory allocated, or on a CPU the process's peak resident memory (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------
# Adversarial finetuning (AYF Sec. 3.3; docs/method.md §7). Our choices, which the paper leaves open:
#   fakes         one per row of the global batch, from its own noise z, at the row's label and lam:
#                 a 1-step sample f(z, 1, 0) or a 2-step one (1 -> 0.5 -> 0), half and half; each is
#                 paired with the row's real image, which has the same label (relativistic pairs).
#   D             the frozen teacher (EMA) encoder, UNet.features, at a noise level t_D ~ U[0, adv_t_max]
#                 shared by the real and the fake of a pair (same t_D, same noise), then DiscriminatorHead.
#   R1 / R2       taken w.r.t. the clean image x, through the noising and the frozen encoder: D is a
#                 function of the image and the noise is part of D (grad_x = (1 - t_D) grad_{x_tD}).
#   order         one generator step and one D step per iteration, simultaneous: both use the same
#                 fakes (made before either update) and the current D, so the D step needs no
#                 generator forward of its own (as toy2d.py). A skipped step skips both.
#   optimizers    the generator's Adam at --init's last learning rate, constant; the head's Adam with
#                 betas (0, 0.99) (R3GAN) at --adv-lr. No EMA of the head.
#   weights       --adv-weight 0.01: at weight 1 the adversarial gradient on the generator measured 30-200x
#                 the EMD one (tiny preset, 16-64 px; EMD's loss is a per-pixel mean of a normalized
#                 tangent), so 0.01 puts them within a small factor. --adv-gamma 0.1 as toy2d.py;
#                 --adv-t-max 0.8: at t_D = 0.8 the signal is already 1/8 of the noise (data std 0.5).
#                 None of the three is tuned on images.

class DiscriminatorHead(torch.nn.Module):
    """The small trainable adversarial head on the frozen teacher's lowest-resolution encoder features:
    1x1 conv -> pixel norm -> MP-SiLU -> global average pool -> linear score, plus a projection of the
    pooled features on an embedding of the label (projection discriminator, Miyato & Koyama 2018),
    which makes the score class-conditional."""

    def __init__(self,
        in_channels,                    # channels of UNet.features (4 model_channels for the 64x64 presets)
        num_classes,                    # length of the one-hot label
        channels = 256,                 # width of the head
    ):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, channels, 1)
        self.score = torch.nn.Linear(channels, 1, bias=False)       # RpGAN sees only D(real) - D(fake)
        self.embed = torch.nn.Linear(num_classes, channels, bias=False)

    def forward(self, h, label):
        h = unet.mp_silu(unet.normalize(self.conv(h), dim=1)).mean(dim=(2, 3))   # (N, channels)
        return self.score(h).squeeze(1) + (self.embed(label) * h).sum(dim=1)    # (N,)


def discriminator(head, encoder, x, t, eps, label):
    """D(x): the image noised to t_D, x_tD = (1 - t_D) x + t_D eps, through the frozen encoder (its
    parameters take no gradient; x does) and the trainable head. Scores (N,)."""
    x_t = torch.lerp(x, eps, bcast(t, x))                                   # (N, 3, R, R)
    return head(encoder.features(x_t, t, label=label), label)


def few_step_samples(net, z, u, **cond):
    """Flow-map samples from noise (docs/method.md §8) with the graph kept: f(f(z, 1, u), u, 0), one step
    where u = 1 (f(z, 1, 1) = z exactly), two where u < 1."""
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    return flow_map(net, flow_map(net, z, one, u, **cond), u, zero, **cond)


def rpgan_d_objective(D, real, fake, gamma, **cond):
    """The discriminator's per-sample objective, RpGAN + gamma/2 (R1 + R2) (R3GAN; docs/method.md §7), and
    its parts for the log: (objective, RpGAN D loss, D(real) - D(fake), R1 + R2), each (N,)."""
    d_real, d_fake = D(real, **cond), D(fake, **cond)
    d_loss = rpgan_d_loss(d_real, d_fake)
    penalty = grad_penalty(D, real, **cond) + grad_penalty(D, fake, **cond)    # ||grad_x D||^2, R1 + R2
    return d_loss + gamma / 2 * penalty, d_loss.detach(), (d_real - d_fake).detach(), penalty.detach()


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
    if B % world_size:
        raise ValueError(f"--batch {B} is not divisible by the {world_size} processes")
    per_rank = B // world_size
    batch_gpu = min(cfg["batch_gpu"] or per_rank, per_rank)
    if per_rank % batch_gpu:
        raise ValueError(f"--batch-gpu {batch_gpu} does not divide the {per_rank} samples per process")
    rounds = per_rank // batch_gpu
    micro_batches = [slice(rank * per_rank + a * batch_gpu, rank * per_rank + (a + 1) * batch_gpu)
                     for a in range(rounds)]                        # this rank's rows of the global batch

    # Setup data.
    if rank != 0:
        dist.barrier()                                              # rank 0 builds a missing cache first
    ds = load_dataset(cfg["data"], cache_dir=cfg["cache_dir"], resolution=cfg["resolution"],
                      max_images=cfg["max_images"])
    if rank == 0 and world_size > 1:
        dist.barrier()
    cfg["num_classes"] = ds.num_classes
    R = cfg["resolution"]

    # Setup networks.
    torch.manual_seed(cfg["seed"])
    net = build_network(cfg).to(device).train()
    if stage != "teacher":
        teacher, teacher_cfg = load_snapshot(cfg["teacher"], device)        # EMA weights, frozen, eval mode
        if teacher_cfg["num_classes"] != ds.num_classes:
            raise ValueError(f"--teacher {cfg['teacher']} has {teacher_cfg['num_classes']} classes, "
                             f"--data {cfg['data']} has {ds.num_classes}")
        if stage == "distill":
            unet.init_student_from_teacher(net, teacher.state_dict())
        else:                                                       # adv: finetune the distilled EMA
            net.load_state_dict(load_snapshot(cfg["init"], device)[0].state_dict())
        if cfg["guidance"] == "auto":                               # v_weak + lam (v - v_weak), docs/method.md §6
            guide, _ = load_snapshot(cfg["guide"], device)
            velocity = functools.partial(guided_velocity, as_velocity(teacher), as_velocity(guide))
        elif cfg["guidance"] == "cfg":
            velocity = functools.partial(guided_velocity, as_velocity(teacher), unconditional(as_velocity(teacher)))
        else:
            velocity = as_velocity(teacher)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    weight = AdaptiveWeight().to(device) if cfg["weighting"] == "adaptive" else None
    params = list(net.parameters()) + (list(weight.parameters()) if weight else [])
    optimizer = torch.optim.Adam(params, lr=cfg["lr"], betas=ADAM_BETAS)
    head = optimizer_D = None
    if stage == "adv":                                              # the same initial head on every rank
        arch = unet.PRESETS[cfg["preset"]]
        head = DiscriminatorHead(arch["model_channels"] * arch["channel_mult"][-1], ds.num_classes).to(device)
        D = functools.partial(discriminator, head, teacher)         # the teacher is the frozen encoder
        optimizer_D = torch.optim.Adam(head.parameters(), lr=cfg["adv_lr"], betas=ADV_BETAS)

    # Resume.
    step = skipped = 0
    state_path = out / "training-state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)   # main() checked its config
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if weight:
            weight.load_state_dict(state["weight"])
        if head:
            head.load_state_dict(state["disc"])
            optimizer_D.load_state_dict(state["disc_optimizer"])
        step, skipped = state["step"], state["skipped"]
        del state
    total_steps = num_steps(cfg)
    status_every = max(1, round(cfg["status_kimg"] * 1000 / B))
    snapshot_every = max(1, round(cfg["snapshot_kimg"] * 1000 / B))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        print(json.dumps(cfg, indent=2))
        print(f"{stage}: {unet.num_params(net) / 1e6:.2f} M parameters, {len(ds)} images of {ds.num_classes} "
              f"classes, {world_size} process(es) on {device}, batch {B} = {world_size} x {rounds} x "
              f"{batch_gpu}, step {step} of {total_steps}" + (" (resumed)" if step else ""))
    device_ids = [device] if device.type == "cuda" else None
    ddp = net if world_size == 1 else DistributedDataParallel(net, device_ids=device_ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")

    # Main training loop.
    loss_sum = torch.zeros([], device=device)                       # per-sample losses of the finite steps
    grad_norm_sum = torch.zeros([], device=device)
    adv_sum = torch.zeros(4, device=device)                         # adv: G adv loss, D loss, D gap, R1 + R2
    finite_steps = steps_since = 0
    tick, stop = time.time(), False
    with stop_requests(rank) as stop_requested:
        while step < total_steps and not stop:
            # Randomness of the whole global batch from (seed, step), identical on every rank.
            idx = batch_indices(step, B, len(ds), cfg["seed"])      # (B,) dataset indices
            gen = torch.Generator(device).manual_seed(seed_of(cfg["seed"], step))
            eps = torch.randn(B, 3, R, R, generator=gen, device=device)              # (B, 3, R, R)
            if stage == "teacher":                                  # logit(t) = ln sigma ~ N(P_mean, P_std^2)
                t = torch.sigmoid(cfg["P_mean"] + cfg["P_std"] * torch.randn(B, generator=gen, device=device))
                s = t
            else:
                t, s = sample_t_s(B, cfg["ts_dist"], cfg["P_mean"], cfg["P_std"], cfg["p_diag"], cfg["p_zero"],
                                  generator=gen, device=device)     # (B,), (B,), 1 >= t >= s >= 0
            lam = cfg["lam_min"] + (cfg["lam_max"] - cfg["lam_min"]) * torch.rand(B, generator=gen, device=device)
            keep = torch.rand(B, generator=gen, device=device) >= cfg["label_dropout"]   # (B,) label dropout
            if stage == "adv":                                      # fakes' noise and jumps, D's noise level
                z = torch.randn(B, 3, R, R, generator=gen, device=device)                # (B, 3, R, R)
                u = torch.where(torch.rand(B, generator=gen, device=device) < 0.5, 1.0, 0.5)   # 1: one step
                t_D = cfg["adv_t_max"] * torch.rand(B, generator=gen, device=device)
                eps_D = torch.randn(B, 3, R, R, generator=gen, device=device)            # (B, 3, R, R)
            if cfg["dropout"]:
                torch.manual_seed(seed_of(cfg["seed"], step, rank))  # residual dropout masks
            r = tangent_warmup(step, cfg["warmup"], cfg["r_max"])
            lr = learning_rate(step, cfg)

            # Forward and backward, one micro-batch at a time; DDP all-reduces in the last backward.
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_adv = torch.zeros([], device=device), torch.zeros(4, device=device)
            pairs = []                                              # adv: (real, fake, label) per micro-batch
            for a, rows in enumerate(micro_batches):
                x0, label = get_batch(ds, idx[rows], device)        # (b, 3, R, R) in [-1, 1], (b, K)
                label = label * keep[rows, None]
                with no_sync(ddp, accumulating=a < rounds - 1):
                    with autocast:
                        if stage == "teacher":
                            loss = fm_loss(ddp, x0, eps[rows], t[rows], label=label)         # (b,)
                        else:
                            x_t = torch.lerp(x0, eps[rows], t[rows, None, None, None])       # (1 - t) x0 + t eps
                            cond = dict(label=label, lam=lam[rows]) if cfg["cond_lam"] else dict(label=label)
                            if cfg["loss"] == "emd":
                                loss = emd_loss(ddp, velocity, x_t, t[rows], s[rows], r=r, c=cfg["c"],
                                                jvp_method=cfg["jvp"], **cond)              # (b,)
                            else:
                                loss = lmd_loss(ddp, velocity, x_t, t[rows], s[rows], c=cfg["c"],
                                                jvp_method=cfg["jvp"], **cond)              # (b,)
                        weighted = weight(loss, t[rows], s[rows]) if weight else loss       # exp(-u) L + u
                        if stage == "adv":                          # + w RpGAN, through the student's jumps
                            fake = few_step_samples(ddp, z[rows], u[rows], **cond)           # (b, 3, R, R)
                            d_cond = dict(t=t_D[rows], eps=eps_D[rows], label=label)
                            g_adv = rpgan_g_loss(D(x0, **d_cond), D(fake, **d_cond))        # (b,)
                            weighted = weighted + cfg["adv_weight"] * g_adv
                            step_adv[0] += g_adv.detach().sum()
                            pairs.append((x0, fake.detach(), label))
                    # sum / B per micro-batch, times world_size against DDP's mean: the global-batch mean.
                    (weighted.sum() * (world_size / B)).backward()
                step_loss += loss.detach().sum()
            if weight and world_size > 1:                           # the tiny weighting head is not under DDP
                for p in weight.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world_size

            # Discriminator: RpGAN + gamma/2 (R1 + R2) on the generator step's pairs, against the same D.
            if stage == "adv":
                optimizer_D.zero_grad(set_to_none=True)             # drop what the generator loss left there
                for rows, (x0, fake, label) in zip(micro_batches, pairs):
                    with autocast:
                        d_obj, *parts = rpgan_d_objective(D, x0, fake, cfg["adv_gamma"], t=t_D[rows],
                                                          eps=eps_D[rows], label=label)     # (b,) each
                    (d_obj.sum() * (world_size / B)).backward()
                    step_adv[1:] += torch.stack([part.sum() for part in parts])
                if world_size > 1:                                  # the head is not under DDP either
                    for p in head.parameters():
                        dist.all_reduce(p.grad)
                        p.grad /= world_size

            # NaN guard: if any loss or gradient is not finite, every rank skips the update (of both nets).
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            finite = torch.isfinite(grad_norm) & torch.isfinite(step_loss)
            if head:
                d_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in head.parameters()])
                finite &= torch.isfinite(d_grad_norm) & torch.isfinite(step_adv).all()
            flags = torch.stack([~finite, torch.tensor(bool(stop_requested), device=device)]).float()
            if world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            nonfinite, stop = flags.tolist()
            if nonfinite:
                skipped += 1
                if rank == 0:
                    print(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
            else:
                if cfg["clip_grad"] > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg["clip_grad"], grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                net.normalize_weights_()                            # EDM2 forced weight normalization
                beta = ema_beta((step + 1) * B, B, cfg)
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)
                if head:
                    optimizer_D.step()
                loss_sum += step_loss
                adv_sum += step_adv
                grad_norm_sum += grad_norm
                finite_steps += 1
            step += 1
            steps_since += 1
            done = step == total_steps or stop

            # Status line.
            if step % status_every == 0 or done:
                if world_size > 1:
                    dist.all_reduce(loss_sum)
                    dist.all_reduce(adv_sum)
                stats = dict(kimg=step * B / 1000, step=step, loss=loss_sum.item() / max(finite_steps * B, 1),
                             lr=lr, r=r, grad_norm=grad_norm_sum.item() / max(finite_steps, 1),
                             sec_per_kimg=(time.time() - tick) / (steps_since * B / 1000),
                             mem_gib=peak_memory_gib(device), skipped=skipped)
                if stage == "adv":                                  # per-sample means; ln 2 = 0.69 at a draw
                    means = (adv_sum / max(finite_steps * B, 1)).tolist()
                    stats.update(zip(("g_adv", "d_loss", "d_real_minus_fake", "r1_r2"), means))
                if rank == 0:
                    print(f"kimg {stats['kimg']:<8.2f} step {step:<7d} loss {stats['loss']:<8.3g} lr {lr:<8.2e} "
                          + (f"r {r:<5.3f} " if cfg["loss"] == "emd" else "")
                          + (f"D {stats['d_loss']:<6.3f} G_adv {stats['g_adv']:<6.3f} "
                             f"D(real)-D(fake) {stats['d_real_minus_fake']:<+7.3f} " if stage == "adv" else "")
                          + f"sec/kimg {stats['sec_per_kimg']:<7.2f} mem {stats['mem_gib']:.2f} GiB "
                          + f"skipped {skipped}")
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(stats) + "\n")
                loss_sum.zero_()
                grad_norm_sum.zero_()
                adv_sum.zero_()
                finite_steps = steps_since = 0
                tick = time.time()

            # Save snapshot: rank 0 writes both files (every rank holds the same weights).
            if rank == 0 and (step % snapshot_every == 0 or done):
                save_atomic(dict(config=cfg, ema=ema.state_dict(), step=step), out / "snapshot.pt")
                save_atomic(dict(config=cfg, step=step, skipped=skipped, net=net.state_dict(),
                                 ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                                 weight=weight.state_dict() if weight else None,
                                 disc=head.state_dict() if head else None,
                                 disc_optimizer=optimizer_D.state_dict() if head else None), state_path)
    if rank == 0:
        print(f"{'stopped' if stop else 'finished'} at step {step}: {out / 'training-state.pt'}")
    if world_size > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Launch.

def setup_process(device, rank, local_rank, world_size):
    """Resolve --device (auto: CUDA if there is one), pin this process's GPU, and join the process
    group when there are several processes (NCCL on CUDA, gloo on CPU, whose processes then share
    the cores). Returns (the resolved --device string, the torch.device). Used by sample.py too."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, device_id=torch_device if torch_device.type == "cuda" else None)
        if torch_device.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    return device, torch_device


def exit_worker():
    """End a process of a process group once its work is done and saved, skipping interpreter
    shutdown: there, gloo's threads abort the process now and then ("terminate called without an
    active exception"; 2 of 30 two-process runs here, 0 of 40 with this exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned(local_rank, cfg, world_size):
    signal.signal(signal.SIGINT, signal.default_int_handler)       # the parent ignores Ctrl-C, not us
    train(cfg, rank=local_rank, local_rank=local_rank, world_size=world_size)
    exit_worker()


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
    state_path = Path(cfg["out"]) / "training-state.pt"
    if state_path.exists():                                         # before any work: another run, or done?
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        check_same_run(state["config"], cfg, state_path)
        if state["step"] >= num_steps(cfg):
            if rank0:
                print(f"{cfg['out']} is finished ({state['step']} steps); nothing to do")
            return

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:         # torchrun
        if cfg["gpus"] != 1:
            raise ValueError("--gpus is for a single-machine launch; under torchrun use --nproc_per_node")
        train(cfg, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
        exit_worker()
    elif cfg["gpus"] > 1:
        if cfg["device"] != "cpu" and torch.cuda.device_count() < cfg["gpus"]:
            raise ValueError(f"--gpus {cfg['gpus']}, but {torch.cuda.device_count()} CUDA devices are visible "
                             f"(--device cpu runs CPU processes)")
        if str(cfg["data"]) != "synthetic":                         # build a missing cache once, here
            load_dataset(cfg["data"], cache_dir=cfg["cache_dir"], resolution=cfg["resolution"])
        with socket.socket() as sock:                               # a free port for the process group
            sock.bind(("localhost", 0))
            os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(sock.getsockname()[1]))
        # Ctrl-C reaches every process of the terminal's group by itself; SIGTERM is forwarded.
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            context = mp.spawn(_spawned, args=(cfg, cfg["gpus"]), nprocs=cfg["gpus"], join=False)

            def forward(signum, frame):
                for process in context.processes:
                    if process.is_alive():
                        os.kill(process.pid, signum)

            sigterm = signal.signal(signal.SIGTERM, forward)
            try:
                while not context.join():
                    pass
            finally:
                signal.signal(signal.SIGTERM, sigterm)
        finally:
            signal.signal(signal.SIGINT, sigint)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
