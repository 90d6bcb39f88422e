"""Evaluate a teacher and its students without downloading anything: a small classifier trained on the
same labelled data supplies the feature space (docs/method.md §11 for why FID needs care).

    python evaluate.py --data SRC --teacher RUN --guide RUN --runs emd=RUN lmd=RUN cm=RUN adv=RUN \\
                       --steps 1,2,4,8 --num 1000 --out DIR

RUN is a train_imagenet.py run folder or its snapshot.pt; SRC any labelled dataset.py source (a class
folder, npz batches, 'synthetic', ...). The classifier (--classifier, default DIR/classifier.pt) is
trained once on SRC if the file is missing, with a held-out split whose accuracy it stores; a
classifier of another dataset, resolution, channel count or class count is refused.

Metrics, for every run at every step count and guidance strength lam (--lams, default 1,2):
    FD           Frechet distance between Gaussians fitted to the classifier's penultimate features
                 of the samples and of --num real images (fid.feature_stats, fid.frechet_distance)
    precision,   k-NN precision and recall in the same features (fid.precision_recall, k = 3)
    recall
    cond. acc.   the fraction of samples that the classifier assigns to the label they were
                 generated for
    distill err  the mean absolute per-pixel difference, in [-1, 1] units (2/255 per 8-bit level),
                 between each k-step sample and the teacher ODE's endpoint from the same noise and
                 label at the same lam; the teacher ODE is Heun with --teacher-steps steps (32: 63
                 velocity evaluations), autoguided by --guide at lam != 1 (sample.ode_sampler)
All metrics are computed on the 8-bit images, as sample.py saves them. Sample i has the same noise and
label in every run (sample.generate, seed i). A run named 'cm' is the consistency-model baseline and
is sampled with consistency re-noising, gamma = 1 (sample.flow_map_sampler); any run takes an explicit
gamma as NAME=RUN:gamma=G. The distillation error of a re-noising sampler measures how far re-noising
moves it off the teacher's trajectory, not only the distillation. A student distilled without lam
input (--guidance none) is evaluated at lam = 1 only.

Outputs: DIR/metrics.json (one row per run, lam and step count; the 'data' row holds the FD and
precision/recall of a second, disjoint set of real images, the floor that sample size allows) and
DIR/eval.png (grids of the same seeds side by side, and the metrics against the step count).
DIR/teacher-lam<lam>.npz keeps the teacher ODE's samples, the longest part: a rerun with the same
teacher and guide snapshots, --teacher-steps and --num reuses them. --jobs N samples in N processes
(one thread each; on a CPU, one per core), each set of samples whole in one process, so the numbers
do not depend on N.
Bad input (a missing run, a classifier or data of another class count, ...) is a one-line error with
exit code 2.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # spinning OpenMP threads: see train_imagenet.py

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from tqdm import tqdm

import fid
import launch
import sample
import train_imagenet as ti
from checkpoint import UsageError
from dataset import DataError, load_dataset
from flowmap import as_velocity


# ----------------------------------------------------------------------------------------------
# The classifier.

class Classifier(torch.nn.Module):
    """Four 3x3 convolutions (three of stride 2) with ReLU, then a linear layer of the whole (R/8)^2 map
    to the features (N, 4 width) and one to the logits (N, K). Flattening rather than pooling keeps
    where strokes are, which tells digits apart. About 3.5 M multiply-adds per 32x32 image at width 16."""

    def __init__(self, num_classes, resolution, width=16, in_channels=3):
        super().__init__()
        w = width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, w, 3, padding=1), torch.nn.ReLU(),              # (N, w, R, R)
            torch.nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), torch.nn.ReLU(),          # (N, 2w, R/2, R/2)
            torch.nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), torch.nn.ReLU(),      # (N, 4w, R/4, R/4)
            torch.nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), torch.nn.ReLU(),      # (N, 4w, R/8, R/8)
            torch.nn.Flatten(),                                                          # (N, 4w (R/8)^2)
            torch.nn.Linear(4 * w * math.ceil(resolution / 8) ** 2, 4 * w), torch.nn.ReLU())
        self.head = torch.nn.Linear(4 * w, num_classes)

    def features(self, x):
        """Penultimate features (N, 4 width) of images (N, C, R, R) in [-1, 1]."""
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))                             # (N, K) logits


def to_input(images, device):
    """uint8 images (N, R, R, C), numpy or torch -> float (N, C, R, R) in [-1, 1], as dataset.get_batch."""
    x = torch.as_tensor(np.asarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def classify(clf, images, batch=500, device="cpu"):
    """(features (N, D) float64 numpy, predicted labels (N,) int64 numpy) of uint8 images (N, R, R, C)."""
    feats, preds = [], []
    for i in range(0, len(images), batch):
        f = clf.features(to_input(images[i:i + batch], device))        # (n, D)
        feats.append(f.double().cpu())
        preds.append(clf.head(f).argmax(dim=1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def split(num_images, heldout, seed=0):
    """(train indices, held-out indices): a fixed random fraction `heldout` (at least one image) held out."""
    perm = np.random.default_rng(seed).permutation(num_images)
    n_held = max(1, round(heldout * num_images))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def train_classifier(ds, kimg, batch=128, lr=2e-3, heldout=0.1, width=16, device="cpu", seed=0):
    """Train a Classifier on all but a held-out fraction of ds; returns (classifier, held-out accuracy).

    Adam with a cosine-decayed learning rate, no augmentation; batches from a seeded generator. On
    MNIST's 10,000 test digits at 32x32 (9,000 to train on), the defaults (40 kimg) gave 96.3% held-out
    accuracy; lr 5e-3 gave 97.5% and 100 kimg 98.4%. 3 to 14 minutes on 2 shared, loaded cores.
    """
    train_idx, held_idx = split(len(ds), heldout, seed)
    if len(train_idx) < 1:
        raise ValueError(f"the data has {len(ds)} images: too few to train a classifier and hold some out")
    torch.manual_seed(seed)
    clf = Classifier(ds.num_classes, ds.images.shape[1], width, ds.channels).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    iters = max(1, math.ceil(kimg * 1000 / batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    rng = np.random.default_rng(seed)
    labels = torch.as_tensor(ds.labels)
    for _ in tqdm(range(iters), desc=f"classifier, {len(train_idx)} images", unit="it"):
        idx = np.sort(rng.choice(train_idx, size=min(batch, len(train_idx)), replace=False))
        loss = nnf.cross_entropy(clf(to_input(ds.images[idx], device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval().requires_grad_(False)
    _, pred = classify(clf, ds.images[held_idx], device=device)
    return clf, float((pred == ds.labels[held_idx]).mean())


def data_id(source):
    """What identifies a dataset source in a classifier file: 'synthetic' or the resolved path."""
    return "synthetic" if str(source) == "synthetic" else str(Path(source).expanduser().resolve())


def check_classifier(info, want, path):
    """A classifier trained on other data, resolution, channels or classes would give meaningless features."""
    info = {"channels": 3, **info}                                     # saved before gray data had 1 channel
    differ = [f"{k} {info[k]!r} there, {v!r} here" for k, v in want.items() if info[k] != v]
    if differ:
        raise ValueError(f"--classifier {path} was trained on other data ({'; '.join(differ)}); "
                         f"pass another --classifier path or delete it to train a new one")


def load_or_train_classifier(path, source, ds, resolution, kimg, device):
    """The classifier in `path` if it was trained on this data, else a new one trained and saved there.

    Returns (classifier, its record: data, resolution, classes, held-out accuracy and split sizes).
    """
    path = Path(path)
    want = dict(data=data_id(source), resolution=resolution, channels=ds.channels, num_classes=ds.num_classes)
    if path.exists():
        saved = torch.load(path, map_location=device, weights_only=True)
        check_classifier(saved["info"], want, path)
        clf = Classifier(saved["info"]["num_classes"], resolution, saved["info"]["width"], ds.channels).to(device)
        clf.load_state_dict(saved["state_dict"])
        return clf.eval().requires_grad_(False), saved["info"]
    clf, accuracy = train_classifier(ds, kimg, device=device)
    train_idx, held_idx = split(len(ds), 0.1)
    info = dict(want, width=16, kimg=kimg, heldout_accuracy=accuracy, num_train=len(train_idx),
                num_heldout=len(held_idx))
    path.parent.mkdir(parents=True, exist_ok=True)
    ti.save_atomic({"info": info, "state_dict": clf.state_dict()}, path)
    print(f"classifier: held-out accuracy {accuracy:.4f} on {len(held_idx)} images -> {path}")
    return clf, info


# ----------------------------------------------------------------------------------------------
# Metrics.

def conditional_accuracy(predicted, labels):
    """The fraction of samples classified as the label they were generated for."""
    return float((np.asarray(predicted) == np.asarray(labels)).mean())


def distillation_error(images, reference):
    """Mean absolute per-pixel difference of uint8 images (N, R, R, C) in [-1, 1] units (1 level = 2/255)."""
    if images.shape != reference.shape:
        raise ValueError(f"distillation_error: shapes differ, {images.shape} vs {reference.shape}")
    return float(np.abs(images.astype(np.int64) - reference.astype(np.int64)).mean() / 127.5)


def feature_metrics(feats, real_feats, real_stats):
    """FD, precision and recall of features (N, D) against the real images' features and their (mu, sigma)."""
    precision, recall = fid.precision_recall(real_feats, feats)
    return dict(fd=fid.frechet_distance(*fid.feature_stats(feats), *real_stats), precision=precision, recall=recall)


def score(images, labels, clf, real_feats, real_stats, reference, device):
    """Every metric of one set of samples; `reference` is the teacher ODE's images of the same seeds or None."""
    feats, pred = classify(clf, images, device=device)
    row = feature_metrics(feats, real_feats, real_stats)
    row["cond_acc"] = conditional_accuracy(pred, labels)
    row["distill_err"] = None if reference is None else distillation_error(images, reference)
    return row


# ----------------------------------------------------------------------------------------------
# The command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data",           required=True,             help="the labelled images the runs were trained on")
    add("--teacher",        required=True,             help="the teacher's run folder or snapshot.pt")
    add("--guide",          default=None,              help="the weak guide: autoguides the teacher at lam != 1")
    add("--runs",           nargs="*", default=[],     help="NAME=RUN or NAME=RUN:gamma=G (name cm: gamma 1)")
    add("--steps",          default="1,2,4,8",         help="student step counts")
    add("--lams",           default="1,2",             help="guidance strengths")
    add("--num",            default=1000, type=int,    help="samples per run, step count and lam (seeds 0..num-1)")
    add("--out",            required=True,             help="folder for metrics.json, eval.png, classifier.pt")
    add("--teacher-steps",  default=32,   type=int,    help="Heun steps of the teacher ODE (NFE 2 N - 1)")
    add("--classifier",     default=None,              help="classifier file, trained if missing (OUT/classifier.pt)")
    add("--classifier-kimg", default=40,  type=float,  help="classifier training length, thousands of images")
    add("--grid-steps",     default="1,4",             help="step counts shown as image grids")
    add("--grid-num",       default=16,   type=int,    help="images per grid")
    add("--cache-dir",      default=None,              help="dataset cache (see dataset.py)")
    add("--batch",          default=250,  type=int,    help="images per sampling batch")
    add("--device",         default="auto",            help="auto (cuda if available), cuda or cpu")
    add("--jobs",           default=1,    type=int,    help="sampling processes, one thread each (CPU: the cores)")
    return p.parse_args(argv)


def parse_run(spec):
    """'emd=runs/emd' -> ('emd', 'runs/emd', 0.0); 'x=runs/x:gamma=0.5' -> (..., 0.5); name 'cm': gamma 1."""
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise ValueError(f"--runs expects NAME=RUN or NAME=RUN:gamma=G, got {spec!r}")
    path, _, option = rest.partition(":gamma=")
    try:
        gamma = float(option) if option else (1.0 if name == "cm" else 0.0)
    except ValueError:
        raise ValueError(f"--runs {spec!r}: gamma must be a number in [0, 1]") from None
    if not 0 <= gamma <= 1:
        raise ValueError(f"--runs {spec!r}: gamma must lie in [0, 1], got {gamma}")
    return name, path, gamma


def check_inputs(args):
    """Parse and check everything that can be wrong before any work; returns (teacher config, runs)."""
    args.steps = sample.parse_ints(args.steps, "--steps")
    args.grid_steps = [k for k in sample.parse_ints(args.grid_steps, "--grid-steps") if k in args.steps]
    try:
        args.lams = [float(v) for v in args.lams.split(",")]
    except ValueError:
        raise ValueError(f"--lams expects numbers like 1,2, got {args.lams!r}") from None
    if min(args.steps) < 1 or args.teacher_steps < 1:
        raise ValueError("--steps and --teacher-steps must be at least 1")
    if args.num < 4:
        raise ValueError(f"--num must be at least 4 (precision/recall use 3 neighbours), got {args.num}")
    teacher = ti.read_config(args.teacher)
    ti.check_stage(teacher, "teacher", f"--teacher {args.teacher}")
    if any(lam != 1 for lam in args.lams):
        if not args.guide:
            raise ValueError(f"--lams {args.lams} guides the teacher's ODE: pass the weak guide with --guide")
        sample.check_same_kind(teacher, ti.read_config(args.guide), f"--guide {args.guide}")
    runs = []
    for spec in args.runs:
        name, path, gamma = parse_run(spec)
        if name in ("data", "teacher") or name in [r[0] for r in runs]:
            raise ValueError(f"--runs: the name {name!r} is taken; give each run its own name")
        config = ti.read_config(path)
        if config["stage"] == "teacher":
            raise ValueError(f"--runs {spec}: {path} is a teacher; runs are flow maps (--stage distill or adv)")
        for key in ("resolution", "num_classes"):
            if config[key] != teacher[key]:
                raise ValueError(f"--runs {spec}: {key} {config[key]}, but --teacher has {teacher[key]}")
        runs.append((name, path, gamma))
    return teacher, runs


def load_data(args, teacher):
    """The dataset at the teacher's resolution; its class and channel counts must be the teacher's."""
    ds = load_dataset(args.data, cache_dir=args.cache_dir, resolution=teacher["resolution"])
    if ds.num_classes != teacher["num_classes"]:
        raise ValueError(f"--data {args.data} has {ds.num_classes} classes, but --teacher was trained on "
                         f"{teacher['num_classes']}: pass the data the runs were trained on")
    if ds.channels != ti.img_channels(teacher):
        raise ValueError(f"--data {args.data} has {ds.channels}-channel images, but --teacher was trained on "
                         f"{ti.img_channels(teacher)}-channel ones: retrain the runs on this data")
    return ds


def real_features(ds, clf, num, device):
    """Features of `num` random real images (the reference) and of a disjoint set of as many (the floor,
    None when the data has fewer than 2 num images)."""
    perm = np.random.default_rng(1).permutation(len(ds))
    n = min(num, len(ds))
    ref = classify(clf, ds.images[np.sort(perm[:n])], device=device)[0]           # (n, D)
    floor = classify(clf, ds.images[np.sort(perm[n:2 * n])], device=device)[0] if 2 * n <= len(ds) else None
    return ref, floor


def teacher_key(args, lam):
    """What the teacher ODE's samples depend on: the snapshots (file and training step), lam, the ODE
    and the seeds; the step is read without the weights."""
    snapshots = {who: (str(ti.snapshot_file(path).resolve()),
                       torch.load(ti.snapshot_file(path), map_location="cpu", weights_only=True, mmap=True)["step"])
                 for who, path in (("teacher", args.teacher), ("guide", args.guide)) if path}
    return json.dumps(dict(snapshots, lam=lam, solver="heun", steps=args.teacher_steps, num=args.num))


def read_cache(cache, key):
    """(images, labels, seconds) from the npz `cache` if it was written for `key`, else None (the teacher
    ODE's samples, the longest part, are reused by a rerun)."""
    if cache.exists():
        with np.load(cache) as data:
            if str(data["key"]) == key:
                return data["images"], data["labels"], float(data["seconds"])
    return None


def write_cache(cache, key, images, labels, seconds):
    with open(cache.with_suffix(".tmp"), "wb") as f:
        np.savez(f, images=images, labels=labels, seconds=seconds, key=key)
    os.replace(cache.with_suffix(".tmp"), cache)


# ----------------------------------------------------------------------------------------------
# Sampling: one job per set of samples (a run, lam and step count), in --jobs processes.

_loaded = {}                                                    # per process: snapshots by path


def draw(job):
    """One job's samples of seeds 0..num-1: (job, images (num, R, R, C) uint8, labels, NFE, seconds).
    The teacher's job is its ODE, autoguided by job['guide'] at lam != 1; a run's is its flow map."""
    device = job["device"]
    for path in (job["path"], job.get("guide")):
        if path and path not in _loaded:
            _loaded[path] = ti.load_snapshot(path, device)
    net, config = _loaded[job["path"]]
    if job["name"] == "teacher":
        weak = as_velocity(_loaded[job["guide"]][0]) if job["guide"] else None
        sampler, nfe = sample.ode_sampler(net, job["steps"], "heun", weak, job["lam"], config.get("t_max", 1.0))
    else:
        lam = job["lam"] if config["cond_lam"] else None
        sampler, nfe = sample.flow_map_sampler(net, job["steps"], job["gamma"], lam,
                                               config.get("t_max", 1.0))          # < 1: EDM2 (edm2.py)
    tick = time.perf_counter()
    images, labels = sample.generate(sampler, list(range(job["num"])), None, config, job["batch"], device,
                                     desc=f"{job['name']}, lam {job['lam']:g}, {job['steps']} steps")
    return job, images, labels, nfe, time.perf_counter() - tick


def cost(job):
    """Network evaluations per sample: Heun's 2 N - 1 (doubled by the guide), or the flow map's steps."""
    if job["name"] == "teacher":
        return (2 * job["steps"] - 1) * (2 if job["lam"] != 1 else 1)
    return job["steps"]


def draw_all(jobs, num_jobs):
    """Every job's draw(), longest first, over num_jobs processes (spawned, one thread each: small
    convolutions scale better over processes than over threads), with a line per finished job and an
    ETA. Returns {(name, lam, steps): (images, labels, NFE, seconds)}."""
    jobs = sorted(jobs, key=cost, reverse=True)
    total, done, results, tick = sum(map(cost, jobs)), 0, {}, time.time()
    pool = None
    if num_jobs > 1 and len(jobs) > 1:
        pool = torch.multiprocessing.get_context("spawn").Pool(min(num_jobs, len(jobs)),
                                                                 initializer=torch.set_num_threads, initargs=(1,))
    try:
        for job, *result in (pool.imap_unordered(draw, jobs) if pool else map(draw, jobs)):
            results[job["name"], job["lam"], job["steps"]] = result
            done += cost(job)
            eta = (time.time() - tick) * (total - done) / done
            print(f"[{len(results)}/{len(jobs)}] {job['name']}, lam {job['lam']:g}, {job['steps']} steps: "
                  f"{result[-1]:.1f} s; eta {launch.format_duration(eta)}", flush=True)
    finally:
        if pool:
            pool.terminate()
        _loaded.clear()                                         # a later call may find other files there
    return results


def prepare(args):
    """Every check that can fail on bad input, before any work: (teacher config, runs, dataset)."""
    teacher_cfg, runs = check_inputs(args)
    ds = load_data(args, teacher_cfg)
    args.classifier = Path(args.classifier or Path(args.out) / "classifier.pt")
    if args.classifier.exists():
        info = torch.load(args.classifier, map_location="cpu", weights_only=True)["info"]
        check_classifier(info, dict(data=data_id(args.data), resolution=teacher_cfg["resolution"],
                                    channels=ds.channels, num_classes=ds.num_classes), args.classifier)
    return teacher_cfg, runs, ds


def evaluate(args, teacher_cfg, runs, ds):
    """Sample every run at every lam and step count, score, write metrics.json and eval.png."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clf, clf_info = load_or_train_classifier(args.classifier, args.data, ds,
                                             teacher_cfg["resolution"], args.classifier_kimg, device)
    real_feats, floor_feats = real_features(ds, clf, args.num, device)
    real_stats = fid.feature_stats(real_feats)

    rows, grids = [], {}
    data_row = dict(run="data", lam=None, steps=None, nfe=None, cond_acc=clf_info["heldout_accuracy"],
                    distill_err=None)
    if floor_feats is not None:
        data_row.update(feature_metrics(floor_feats, real_feats, real_stats))
    rows.append(data_row)
    grids["data"] = ds.images[np.random.default_rng(2).choice(len(ds), args.grid_num, replace=False)]

    jobs, cached, skipped = [], {}, []
    common = dict(num=args.num, batch=args.batch, device=device)
    for lam in args.lams:
        key = teacher_key(args, lam)
        cached["teacher", lam] = read_cache(out / f"teacher-lam{lam:g}.npz", key)
        if cached["teacher", lam] is None:
            jobs.append(dict(common, name="teacher", path=args.teacher, guide=args.guide, lam=lam,
                             steps=args.teacher_steps, key=key))
        else:
            print(f"teacher, lam {lam:g}: reusing {out / f'teacher-lam{lam:g}.npz'}")
    for name, path, gamma in runs:
        config = ti.read_config(path)
        for lam in args.lams:
            if lam != 1 and not config["cond_lam"]:
                skipped.append(f"{name} at lam {lam:g}: distilled with --guidance {config['guidance']}, no lam input")
                continue
            jobs += [dict(common, name=name, path=path, gamma=gamma, lam=lam, steps=k) for k in args.steps]
    results = draw_all(jobs, args.jobs)
    for job in jobs:
        if job["name"] == "teacher":
            images, labels, _, seconds = results["teacher", job["lam"], job["steps"]]
            write_cache(out / f"teacher-lam{job['lam']:g}.npz", job["key"], images, labels, seconds)

    def add_row(name, lam, steps, nfe, images, labels, seconds, reference):
        row = dict(run=name, lam=lam, steps=steps, nfe=nfe, seconds=round(seconds, 2),
                   **score(images, labels, clf, real_feats, real_stats, reference, device))
        rows.append(row)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    references, nfe = {}, 2 * args.teacher_steps - 1
    for lam in args.lams:
        images, labels, *_, seconds = cached["teacher", lam] or results["teacher", lam, args.teacher_steps]
        add_row("teacher", lam, args.teacher_steps, nfe, images, labels, seconds, None)
        references[lam] = images
        grids["teacher", lam] = images[:args.grid_num]
    for name, _, _ in runs:
        for lam in args.lams:
            for steps in args.steps:
                if (name, lam, steps) in results:
                    images, labels, nfe, seconds = results[name, lam, steps]
                    add_row(name, lam, steps, nfe, images, labels, seconds, references[lam])
                    if steps in args.grid_steps:
                        grids[name, lam, steps] = images[:args.grid_num]

    metrics = dict(
        data=args.data, teacher=args.teacher, guide=args.guide, num=args.num, seeds=f"0-{args.num - 1}",
        teacher_ode=f"heun, {args.teacher_steps} steps ({2 * args.teacher_steps - 1} NFE), autoguided by --guide at lam != 1",
        runs={name: dict(path=path, gamma=gamma) for name, path, gamma in runs},
        classifier=dict(path=str(args.classifier), **clf_info),
        distill_err="mean absolute per-pixel difference to the teacher ODE's endpoint (same seed, same lam), "
                    "8-bit images in [-1, 1] units",
        data_row="FD / precision / recall of a second set of real images (the floor at this --num), "
                 "cond_acc = the classifier's held-out accuracy",
        skipped=skipped, rows=rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot(out / "eval.png", rows, grids, [r[0] for r in runs], args)
    print(f"-> {out / 'metrics.json'}, {out / 'eval.png'}")
    return metrics


# ----------------------------------------------------------------------------------------------
# The figure.

def grid_image(images):
    """uint8 images (n, R, R, C) -> one RGB grid (sample.tile); gray (C = 1) is copied to 3 channels,
    because imshow would paint a single channel with a color map."""
    grid = sample.tile(images)                                          # (rows R, cols R, C)
    return np.broadcast_to(grid, (*grid.shape[:2], 3))                  # (rows R, cols R, 3)


def plot(path, rows, grids, names, args):
    """Grids (one row per lam and grid step count: data, teacher ODE, then each run) over the curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid_rows = [(lam, k) for lam in args.lams for k in args.grid_steps] or [(lam, None) for lam in args.lams]
    cols = 2 + len(names)
    fig = plt.figure(figsize=(2 * max(cols, 6), 2 * len(grid_rows) + 3.2))
    spec = fig.add_gridspec(len(grid_rows) + 1, max(cols, 3), height_ratios=[1] * len(grid_rows) + [1.6])
    for i, (lam, k) in enumerate(grid_rows):
        cells = [("data", grids["data"] if i == 0 else None),
                 (f"teacher ODE, λ={lam:g}", grids[("teacher", lam)])]
        cells += [(f"{name}, {k} step{'s' * (k != 1)}, λ={lam:g}", grids.get((name, lam, k))) for name in names]
        for j, (title, images) in enumerate(cells):
            ax = fig.add_subplot(spec[i, j])
            ax.axis("off")
            if images is not None:
                ax.imshow(grid_image(images))
                ax.set_title(title, fontsize=8)
    curves = [("fd", "FD (classifier features)"), ("cond_acc", "conditional accuracy"),
              ("distill_err", "distillation error (mean |Δ|)")]
    width = max(cols, 3) // 3
    for c, (key, label) in enumerate(curves):
        ax = fig.add_subplot(spec[-1, c * width:(c + 1) * width])
        for n, name in enumerate(names):
            for lam, style in zip(args.lams, ["-", "--", ":", "-."]):
                pts = [(r["steps"], r[key]) for r in rows if r["run"] == name and r["lam"] == lam]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{n}", label=f"{name} λ={lam:g}")
        for lam, style in zip(args.lams, ["-", "--", ":", "-."]):
            teacher = [r[key] for r in rows if r["run"] == "teacher" and r["lam"] == lam]
            if teacher and teacher[0] is not None:
                ax.axhline(teacher[0], color="k", linestyle=style, linewidth=1, label=f"teacher ODE λ={lam:g}")
        data = rows[0].get(key)
        if key != "distill_err" and data is not None:
            ax.axhline(data, color="gray", linewidth=3, alpha=0.4, label="data")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(label, fontsize=9)
        if c == 0:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        checked = prepare(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return evaluate(args, *checked)
    except (DataError, UsageError) as error:                        # e.g. a corrupt checkpoint met while sampling
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
