"""Sample a trained AYF flow map or its flow-matching teacher: image files, FID, or images per second.

    python sample.py --ckpt runs/ayf-S --steps 4 --guidance 1.5 --seeds 0-63 --grid out.png      # CPU or 1 GPU
    torchrun --nproc_per_node 8 sample.py --ckpt runs/ayf-S --steps 2 --seeds 0-49999 --out samples.npz
    python sample.py --ckpt runs/ayf-S --steps 1,2,4,8 --fid --ref imagenet64-ref.npz --detector inception.pt
    python sample.py --ckpt runs/teacher-S --steps 32 --guide runs/guide-XS --guidance 2 --grid teacher.png
    python sample.py --ckpt runs/ayf-S --steps 1,2,4 --bench --teacher runs/teacher-S --teacher-steps 32

The network is rebuilt from the checkpoint alone: train_imagenet.load_snapshot returns the EMA weights
and the config they were trained with, or an EDM2 network pickle as a teacher (edm2.py). The
checkpoint's stage picks the sampler (docs/method.md §8). With an EDM2 teacher, or a student of one,
the grid starts at its t_max = 80/81 instead of 1, from x = t_max z (flowmap.time_grid):

    flow map (distill,   x_{i+1} = f(x_i, t_i, t_{i+1}) on a uniform grid 1 = t_0 > ... > t_N = 0,
    adv)                 NFE = N. --gamma > 0: gamma-sampling, which re-noises after every jump
                         (1 = consistency-model sampling). The guidance strength lam (--guidance) is
                         an input of a student distilled with guidance, so it costs nothing.
    teacher              the probability-flow ODE dx/dt = v(x, t) with --solver euler (NFE = N) or
                         heun (NFE = 2N - 1). Guided by --guide (autoguidance: a weaker teacher) or
                         --cfg (the same teacher without label): v = v_weak + lam (v - v_weak), which
                         doubles the network evaluations.

Reproducibility: image i depends only on seed i (and its class), never on the batch size or the
number of processes. Its noise z, its random class and every re-noising draw come, in that order,
from its own torch.Generator().manual_seed(seed) on the CPU, and move to the device afterwards.

Outputs: --grid PNG, --outdir with one PNG per seed (seed000042.png), --out npz in the layout of the
ADM / EDM FID tools (uint8 (N, H, W, C) under 'arr_0', class indices under 'labels'; C = 1 for a run
trained on gray idx digits, whose PNGs are 8-bit grayscale). With several
step counts each output gets a '-<N>steps' suffix. --fid prints FID per step count against --ref
(mu, sigma) or --ref-data (real images, which add precision and recall); --bench prints images per
second per step count, and the speed-up over the teacher's ODE with --teacher. Nothing is downloaded.

Launch: one process by default (CUDA if there is one); --gpus N spawns N processes (NCCL, or gloo
with --device cpu); under torchrun the processes come from RANK, WORLD_SIZE and LOCAL_RANK. Seeds are
strided over the processes and the images gathered on rank 0 in seed order; --batch is per process.
"""
import os

# Spinning OpenMP threads make CPU runs on shared cores many times slower (see train_imagenet.py).
# It must be set before torch loads its OpenMP runtime; an OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import functools
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from PIL import Image
from tqdm import tqdm

import fid
import train_imagenet as ti
from checkpoint import UsageError, check_device, check_ranges, check_writable
from dataset import DataError, load_dataset
from flowmap import as_velocity, guided_velocity, sample_flow_map, sample_gamma, sample_ode, time_grid
from launch import launch, setup_process, under_torchrun


def parse_args(argv=None):
    """The command line; defaults that depend on the checkpoint are None here and set by resolve_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    # What to sample.
    add("--ckpt",          required=True,             help="run folder or snapshot.pt, flow map or teacher")
    add("--steps",         default=None,              help="step counts, e.g. 4 or 1,2,4,8 (flow map 4, teacher 32)")
    add("--guidance",      default=1.0,  type=float,  help="guidance strength lam; 1: no guidance")
    add("--seeds",         default=None,              help="e.g. 0-63 or 0,5,9-12 (0 .. num-1)")
    add("--num",           default=None, type=int,    help="images when --seeds is not given (64; --fid: 50000)")
    add("--classes",       default=None,              help="class indices cycled over the seeds, e.g. 1,5,207 "
                                                           "(default: a random class per seed)")
    # Flow map only.
    add("--gamma",         default=0.0,  type=float,  help="gamma-sampling: 0 deterministic, 1 consistency-style")
    # Teacher only (--solver also sets the solver of --bench --teacher).
    add("--solver",        default=None, choices=["euler", "heun"], help="ODE solver (heun)")
    add("--guide",         default=None,              help="autoguidance: the weak teacher's run folder")
    add("--cfg",           action="store_true",       help="classifier-free guidance (weak = teacher without label)")
    # Outputs.
    add("--grid",          default=None,              help="PNG with all images in a square-ish grid")
    add("--outdir",        default=None,              help="folder for one PNG per seed")
    add("--out",           default=None,              help="npz: uint8 (N, H, W, C) 'arr_0' and 'labels'")
    # FID.
    add("--fid",           action="store_true",       help="FID of the seeds' images at each step count")
    add("--detector",      default=None,              help="Inception TorchScript file (inception-2015-12-05.pt)")
    add("--ref",           default=None,              help="reference statistics, npz with 'mu' and 'sigma'")
    add("--ref-data",      default=None,              help="or real images (dataset.py source); adds prec./recall")
    # Speed.
    add("--bench",         action="store_true",       help="images per second at each step count")
    add("--teacher",       default=None,              help="--bench: also time this teacher's ODE")
    add("--teacher-steps", default=None, type=int,    help="--bench: the teacher's ODE steps (32)")
    add("--reps",          default=5,    type=int,    help="--bench: timed batches after one warm-up batch")
    # Launch.
    add("--batch",         default=64,   type=int,    help="images per process and forward")
    add("--device",        default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is one")
    add("--gpus",          default=1,    type=int,    help="processes to spawn on this machine")
    return p.parse_args(argv)


def parse_ints(text, flag):
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    try:
        values = []
        for part in text.split(","):
            first, _, last = part.partition("-")
            values += range(int(first), int(last or first) + 1)
    except ValueError:
        raise UsageError(f"{flag} expects integers and ranges like 0-63 or 1,5,207, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} {text!r} is empty")
    return values


def resolve_args(args, config):
    """Check the flags against the checkpoint's config and fill in the defaults that depend on it.

    Everything that can fail is checked here, before any process starts or any image is sampled.
    """
    flow_map = config["stage"] != "teacher"
    what = f"--ckpt {args.ckpt} is a {'flow map' if flow_map else 'teacher'} (stage {config['stage']})"
    if flow_map:
        if args.guide or args.cfg:
            raise UsageError(f"{what}: --guide and --cfg guide a teacher's ODE; a flow map distilled with "
                             f"guidance takes lam as an input, set by --guidance")
        if args.solver and not args.teacher:
            raise UsageError(f"{what}: --solver is for a teacher's ODE (or --bench --teacher)")
        if args.guidance != 1 and not config["cond_lam"]:
            raise UsageError(f"{what} distilled with --guidance {config['guidance']}, so it has no lam input; "
                             f"it samples only at --guidance 1, not {args.guidance}")
        if args.guidance != 1 and not config["lam_min"] <= args.guidance <= config["lam_max"]:
            warnings.warn(f"--guidance {args.guidance} lies outside the lam range [{config['lam_min']}, "
                          f"{config['lam_max']}] the student was trained on")
        if not 0 <= args.gamma <= 1:
            raise UsageError(f"--gamma must lie in [0, 1], got {args.gamma}")
    else:
        if args.gamma:
            raise UsageError(f"{what}: --gamma is for flow-map sampling")
        if args.teacher or args.teacher_steps:
            raise UsageError(f"{what}: --teacher and --teacher-steps compare a flow map with its teacher")
        if args.guide and args.cfg:
            raise UsageError("--guide (autoguidance) and --cfg are two kinds of guidance; pick one")
        if args.guidance != 1 and not (args.guide or args.cfg):
            raise UsageError(f"--guidance {args.guidance} on a teacher needs a weak model: --guide RUN or --cfg")
        if args.cfg and config["label_dropout"] == 0:
            raise UsageError(f"{what} was trained without label dropout, so it has no unconditional mode for --cfg")
        if args.guide:
            check_same_kind(config, ti.read_config(args.guide), f"--guide {args.guide}")
    if args.teacher:
        if not args.bench:
            raise UsageError("--teacher is only used by --bench")
        check_same_kind(config, ti.read_config(args.teacher), f"--teacher {args.teacher}")

    outputs = [flag for flag in ("grid", "outdir", "out") if getattr(args, flag)]
    if args.bench and (outputs or args.fid):
        raise UsageError("--bench only measures speed; run it without --grid, --outdir, --out and --fid")
    if not (outputs or args.fid or args.bench):
        raise UsageError("nothing to do: pass --grid, --outdir, --out, --fid or --bench")
    if args.fid:
        if not args.detector:
            raise UsageError("--fid needs --detector, the Inception TorchScript file inception-2015-12-05.pt "
                             f"(fetch it once by hand from {fid.DETECTOR_URL}; nothing is downloaded here)")
        if bool(args.ref) == bool(args.ref_data):
            raise UsageError("--fid needs exactly one reference: --ref stats.npz (mu, sigma) or --ref-data SOURCE")
        for path in (args.detector, args.ref):
            if path and not os.path.isfile(path):
                raise UsageError(f"no such file: {path}")
    check_ranges(vars(args), positive=("num", "batch", "reps", "teacher_steps", "gpus"))
    check_device(args.device, args.gpus)
    for flag in outputs:                                            # before sampling, which may take hours
        check_writable(getattr(args, flag), f"--{flag}", folder=flag == "outdir")

    args.flow_map = flow_map
    args.steps = parse_ints(args.steps or ("4" if flow_map else "32"), "--steps")
    if min(args.steps) < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    args.solver = args.solver or "heun"
    args.teacher_steps = args.teacher_steps or 32
    if args.seeds and args.num:
        raise UsageError("--seeds and --num both say which images to sample; give one")
    if args.seeds:
        args.seeds = parse_ints(args.seeds, "--seeds")
    else:
        args.seeds = list(range(args.num or (50000 if args.fid else 64)))
    args.classes = parse_ints(args.classes, "--classes") if args.classes else None
    if args.classes and not all(0 <= k < config["num_classes"] for k in args.classes):
        raise UsageError(f"--classes must lie in 0..{config['num_classes'] - 1}, got {args.classes}")
    return args


def check_same_kind(config, other, what):
    """A guide or teacher must be a teacher for the same images and classes as --ckpt."""
    ti.check_stage(other, "teacher", what)
    for key in ("resolution", "num_classes"):
        if other[key] != config[key]:
            raise UsageError(f"{what} has {key} {other[key]}, but --ckpt has {config[key]}")
    channels = ti.img_channels(other), ti.img_channels(config)
    if channels[0] != channels[1]:
        raise UsageError(f"{what} has {channels[0]} image channels, but --ckpt has {channels[1]}")


# ----------------------------------------------------------------------------------------------
# Samplers: sample(z, label, noise) -> x0, with z (N, C, R, R), one-hot label (N, K), noise(x) -> eps.

def flow_map_sampler(net, steps, gamma, lam, t_max=1.0):
    """Deterministic flow-map sampling, or gamma-sampling with re-noising from `noise`; NFE = steps.

    lam is None for a student without a lam input, else the guidance strength it was distilled for.
    t_max < 1: the teacher's range ends there (EDM2: 80 / 81), so sampling starts from t_max z
    (flowmap.time_grid).
    """
    def sample(z, label, noise):
        cond = dict(label=label)
        if lam is not None:
            cond["lam"] = torch.full((len(z),), lam, device=z.device)  # (N,)
        grid = time_grid(steps, z.device, z.dtype, t_max)
        if gamma == 0:
            return sample_flow_map(net, t_max * z, steps, grid, **cond)
        return sample_gamma(net, t_max * z, steps, gamma, grid, noise=noise, **cond)
    return sample, steps


def ode_sampler(net, steps, solver, weak=None, lam=1.0, t_max=1.0):
    """The teacher's probability-flow ODE from t_max (as flow_map_sampler), guided by `weak` (a
    velocity) when lam != 1.

    Returns (sample, NFE) with NFE counting velocity evaluations; guidance doubles the network calls.
    """
    velocity = as_velocity(net)
    if lam != 1:
        velocity = functools.partial(guided_velocity, velocity, weak, lam=lam)    # v_weak + lam (v - v_weak)

    def sample(z, label, noise):
        return sample_ode(velocity, t_max * z, steps, solver, time_grid(steps, z.device, z.dtype, t_max), label=label)
    return sample, steps if solver == "euler" else 2 * steps - 1


# ----------------------------------------------------------------------------------------------
# Per-seed inputs and generation.

def seed_inputs(seeds, positions, classes, num_classes, resolution, channels=3):
    """Noise, class and generators of the images at `positions` of the seed list, each from its own seed.

    Returns z (n, C, R, R) with C = channels, labels (n,) int64 and the n generators, which are left
    positioned for the re-noising draws. The random class is drawn even with --classes, so z and the
    re-noising of a seed do not depend on how its class was chosen.
    """
    gens = [torch.Generator().manual_seed(seeds[i]) for i in positions]
    z = torch.stack([torch.randn(channels, resolution, resolution, generator=g) for g in gens])    # (n, C, R, R)
    labels = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])      # (n,)
    if classes:
        labels = torch.tensor([classes[i % len(classes)] for i in positions])             # (n,)
    return z, labels, gens


def seeded_noise(gens):
    """noise(x) for the re-noising samplers: row i is drawn from gens[i], so it depends only on its seed."""
    def noise(x):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)
    return noise


def to_uint8(x):
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def sample_seeds(sample, seeds, positions, classes, config, device):
    """Images (n, C, R, R) in [-1, 1] and labels (n,) of the seeds at `positions` of the list, in one batch."""
    z, label, gens = seed_inputs(seeds, positions, classes, config["num_classes"], config["resolution"],
                                 ti.img_channels(config))
    onehot = nnf.one_hot(label, config["num_classes"]).float()        # (n, K)
    return sample(z.to(device), onehot.to(device), seeded_noise(gens)), label


def generate(sample, seeds, classes, config, batch, device, rank=0, world_size=1, desc="sampling"):
    """Every seed's image and label, uint8 (N, R, R, C) and int64 (N,) in seed order on rank 0.

    Rank r samples the seeds at positions r, r + world_size, ...; other ranks return (None, None).
    """
    R, C = config["resolution"], ti.img_channels(config)
    mine = range(rank, len(seeds), world_size)                          # positions in the seed list
    images = [torch.empty(0, R, R, C, dtype=torch.uint8)]              # empty first parts: a rank may get
    labels = [torch.empty(0, dtype=torch.int64)]                        # no seeds at all
    for start in tqdm(range(0, len(mine), batch), desc=desc, unit="batch", disable=rank != 0):
        x, label = sample_seeds(sample, seeds, mine[start:start + batch], classes, config, device)
        images.append(to_uint8(x).cpu())                               # (n, R, R, C)
        labels.append(label)
    parts = [(torch.cat(images).numpy(), torch.cat(labels).numpy())]
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(parts[0], gathered, dst=0)
        parts = gathered
    if rank != 0:
        return None, None
    all_images = np.empty((len(seeds), R, R, C), dtype=np.uint8)        # (N, R, R, C)
    all_labels = np.empty(len(seeds), dtype=np.int64)                   # (N,)
    for r, (rank_images, rank_labels) in enumerate(parts):              # undo the striding
        all_images[r::world_size] = rank_images
        all_labels[r::world_size] = rank_labels
    return all_images, all_labels


# ----------------------------------------------------------------------------------------------
# Outputs.

def output_path(path, steps, several):
    """path itself, or with several step counts 'out.png' -> 'out-4steps.png' (folders likewise)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{steps}steps{path.suffix}") if several else path


def to_pil(image):
    """uint8 (H, W, C) -> a PIL image, RGB or, for C = 1, 8-bit grayscale ('L'): PIL has no (H, W, 1)
    mode, and gray saved as gray is exactly what was sampled, in a third of the bytes of RGB."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def tile(images):
    """uint8 images (N, R, R, C) -> one (rows R, cols R, C) array of ceil(sqrt(N)) columns, empty cells black."""
    N, R, C = len(images), images.shape[1], images.shape[-1]
    cols = math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    cells = np.zeros((rows * cols, R, R, C), dtype=np.uint8)
    cells[:N] = images
    return cells.reshape(rows, cols, R, R, C).transpose(0, 2, 1, 3, 4).reshape(rows * R, cols * R, C)


def save_grid(images, path):
    """uint8 images (N, R, R, C) as one PNG (tile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(tile(images)).save(path)


def save_outputs(images, labels, seeds, steps, args):
    """Write --grid, --outdir and --out for one step count."""
    several = len(args.steps) > 1
    if args.grid:
        save_grid(images, output_path(args.grid, steps, several))
    if args.outdir:
        folder = output_path(args.outdir, steps, several)
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(seeds, images):
            to_pil(image).save(folder / f"seed{seed:06d}.png")
    if args.out:
        path = output_path(args.out, steps, several)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=images, labels=labels)
    written = [str(output_path(p, steps, several)) for p in (args.grid, args.outdir, args.out) if p]
    print(f"{steps} steps: {len(images)} images -> {', '.join(written)}")


def reference(args, resolution, detector, device):
    """(mu, sigma, real features or None) of the FID reference: --ref statistics, or --ref-data images.

    From real images, up to --num of them are drawn at random (fixed seed): a dataset folder is sorted
    by class, so its first images would cover only a few classes.
    """
    if args.ref:
        return *fid.load_reference(args.ref), None
    ds = load_dataset(args.ref_data, resolution=resolution)
    idx = np.sort(np.random.default_rng(0).choice(len(ds), size=min(len(args.seeds), len(ds)), replace=False))
    feats = fid.compute_features(detector, ds.images[idx], device=device)     # (n, D)
    return *fid.feature_stats(feats), feats


# ----------------------------------------------------------------------------------------------
# Speed.

def sync(device):
    """Wait for the queued CUDA work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(rows, config, batch, device, reps, vs_last=False):
    """Print images per second of each row (name, steps, sample, NFE); with vs_last, also the ratio to
    the last row (the teacher).

    Every sampler first runs one untimed batch (allocator, cuDNN autotuning); then the median time
    of `reps` batches of the same inputs (seeds 0 .. batch-1) counts.
    """
    R, K = config["resolution"], config["num_classes"]
    z, label, gens = seed_inputs(list(range(batch)), range(batch), None, K, R, ti.img_channels(config))
    z, onehot = z.to(device), nnf.one_hot(label, K).float().to(device)           # (B, C, R, R), (B, K)
    speeds = []
    for name, steps, sample, nfe in tqdm(rows, desc="benchmark", unit="sampler"):
        sample(z, onehot, seeded_noise(gens))                          # warm-up
        times = []
        for _ in range(reps):
            sync(device)
            tick = time.perf_counter()
            sample(z, onehot, seeded_noise(gens))
            sync(device)
            times.append(time.perf_counter() - tick)
        speeds.append(batch / statistics.median(times))
    print(f"{'sampler':<22} {'steps':>5} {'NFE':>5} {'img/s':>10}" + (f" {'vs teacher':>11}" if vs_last else ""))
    for (name, steps, _, nfe), speed in zip(rows, speeds):
        ratio = f" {speed / speeds[-1]:>10.1f}x" if vs_last else ""
        print(f"{name:<22} {steps:>5} {nfe:>5} {speed:>10.2f}{ratio}")
    print(f"batch {batch} on {device}, median of {reps} timed batches after a warm-up batch")


# ----------------------------------------------------------------------------------------------
# One process.

def run(args, rank=0, local_rank=0, world_size=1):
    """Sample (and score, or time) in one process; with world_size > 1 one of a process group."""
    args.device, device = setup_process(args.device, rank, local_rank, world_size)

    # Setup networks.
    net, config = ti.load_snapshot(args.ckpt, device)
    weak = None
    if args.guide:
        weak = as_velocity(ti.load_snapshot(args.guide, device)[0])
    elif args.cfg:
        weak = ti.unconditional(as_velocity(net))

    if args.flow_map:
        name = "flow map" + (f" gamma {args.gamma:g}" if args.gamma else "")
    else:
        name = f"teacher {args.solver}" + (" autoguided" if args.guide else " cfg" if args.cfg else "")

    def sampler(steps):
        """(sample, NFE) of the checkpoint at a step count."""
        t_max = config.get("t_max", 1.0)                                # < 1 for EDM2's networks
        if args.flow_map:
            return flow_map_sampler(net, steps, args.gamma, args.guidance if config["cond_lam"] else None, t_max)
        return ode_sampler(net, steps, args.solver, weak, args.guidance, t_max)

    # Speed.
    if args.bench:
        rows = [(name, steps, *sampler(steps)) for steps in args.steps]
        if args.teacher:
            teacher, teacher_cfg = ti.load_snapshot(args.teacher, device)
            rows.append((f"teacher {args.solver}", args.teacher_steps,
                         *ode_sampler(teacher, args.teacher_steps, args.solver, t_max=teacher_cfg.get("t_max", 1.0))))
        benchmark(rows, config, args.batch, device, args.reps, vs_last=bool(args.teacher))
        return

    # FID reference, on rank 0, before any sampling: a bad file fails at once.
    if args.fid and rank == 0:
        try:
            detector = fid.load_detector(args.detector, device)
            mu_ref, sigma_ref, real_feats = reference(args, config["resolution"], detector, device)
        except ValueError as error:                                 # not TorchScript, stats without mu / sigma
            raise UsageError(str(error)) from None

    # Sample each step count.
    for steps in args.steps:
        sample, nfe = sampler(steps)
        images, labels = generate(sample, args.seeds, args.classes, config, args.batch, device, rank, world_size,
                                  desc=f"{name}, {steps} steps")
        if rank != 0:
            continue
        if args.grid or args.outdir or args.out:
            save_outputs(images, labels, args.seeds, steps, args)
        if args.fid:
            feats = fid.compute_features(detector, images, device=device)     # (N, D)
            line = f"{name:<10} steps {steps:<3d} NFE {nfe:<4d} lam {args.guidance:<5g} " \
                   f"FID {fid.frechet_distance(*fid.feature_stats(feats), mu_ref, sigma_ref):.3f}"
            if real_feats is not None:
                precision, recall = fid.precision_recall(real_feats, feats, device=device)
                line += f"  precision {precision:.3f}  recall {recall:.3f}"
            print(f"{line}  ({len(images)} images)")
    if world_size > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Launch.

def main(argv=None):
    args = parse_args(argv)
    resolve_args(args, ti.read_config(args.ckpt))                       # read_config: no snapshot, clear error
    if args.bench and args.gpus > 1:
        raise UsageError("--bench times one process; drop --gpus")
    if args.bench and under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise UsageError("--bench times one process; launch it without torchrun")
    launch(run, args, args.gpus, args.device, user_errors=(DataError, UsageError))


if __name__ == "__main__":
    try:
        main()
    except (DataError, UsageError) as error:                        # a user's mistake: one line, exit code 2
        print(f"sample.py: error: {error}", file=sys.stderr)
        sys.exit(2)
