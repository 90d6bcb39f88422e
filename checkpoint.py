"""Checkpoints and run folders for train_imagenet.py and sample.py, and the checks that come before
any work: that a checkpoint is whole and finite, that the teacher / guide / init runs fit together,
that flags lie in range, that --out is writable, has the disk space, and that no other run uses it.

    snapshot.pt        {"config", "ema", "step", "sha256"}   what load_snapshot() needs
    training-state.pt  {"config", "step", ..., "sha256"}     what a rerun resumes from
    *-prev.pt          the files as the save before the last one left them (a corrupt file names it)
    run.lock           "pid hostname" of the run that is using the folder

sha256 is a digest of every tensor (name, dtype, shape, bytes) and every other value of the dict,
computed before the save and checked after every load: a file damaged on disk is refused instead of
training or sampling from NaN weights. Every user mistake is a UsageError: train_imagenet.py and
sample.py print its one line and exit with 2.
"""
import errno
import hashlib
import io
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

import edm2
import unet


class UsageError(ValueError):
    """A problem the user can fix (a flag, a path, a checkpoint, the disk, another run on the same
    --out); the message is one line that names the problem and the fix."""


def check_flags(rules):
    """rules: (bad, message) pairs, checked in order; the first bad one is raised as a UsageError."""
    for bad, message in rules:
        if bad:
            raise UsageError(message)


def check_ranges(values, positive=(), nonnegative=(), unit=()):
    """Flag values (keys of `values`, None: not given) that must be > 0, >= 0, or lie in [0, 1]."""
    def flag(k):
        return "--" + k.replace("_", "-")
    check_flags([(values[k] is not None and values[k] <= 0, f"{flag(k)} must be positive, got {values[k]}")
                 for k in positive]
                + [(values[k] < 0, f"{flag(k)} must be >= 0, got {values[k]}") for k in nonnegative]
                + [(not 0 <= values[k] <= 1, f"{flag(k)} must lie in [0, 1], got {values[k]}") for k in unit])


def check_device(device, gpus):
    """--device cuda needs CUDA; --gpus N on CUDA needs N visible devices; torchrun starts the processes itself."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_flags([("RANK" in os.environ and "WORLD_SIZE" in os.environ and gpus != 1,
                  f"--gpus {gpus} under torchrun, which starts the processes itself: drop --gpus and use "
                  f"torchrun's --nproc_per_node"),
                 (device == "cuda" and not visible, "--device cuda, but no CUDA device is visible; use --device cpu"),
                 (device != "cpu" and gpus > 1 and visible < gpus,
                  f"--gpus {gpus}, but {visible} CUDA devices are visible (--device cpu runs CPU processes)")])


def check_writable(path, what, folder=False):
    """A file or folder that a run will write, checked before any work: refused if it is the other kind,
    or if the folder it goes into cannot be written."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if existing == path and path.is_dir() != folder:
        raise UsageError(f"{what} {path} is a {other}, not a {kind}; pick another path")
    where = path if existing == path and folder else path.parent if existing == path else existing
    if not where.is_dir():
        raise UsageError(f"{what} {path}: {where} is a file, not a folder; pick another path")
    if not os.access(where, os.W_OK | os.X_OK) or (existing == path and not os.access(path, os.W_OK)):
        raise UsageError(f"{what} {path}: {where} is not writable; pick another path or fix its permissions")


# ----------------------------------------------------------------------------------------------
# Reading and checking checkpoints.

def check_config(cfg):
    """train_imagenet.py: every flag's value, before any work: a mistake is a one-line UsageError (exit code 2)."""
    check_ranges(cfg, positive=("kimg", "batch", "batch_gpu", "gpus", "resolution", "max_images", "P_std", "c",
                                "status_kimg", "snapshot_kimg"),
                 nonnegative=("lr", "ema_kimg", "ema_rampup", "lr_rampup", "lr_decay", "warmup", "seed", "clip_grad",
                              "adv_weight", "adv_gamma", "adv_lr",
                              "branch_lr_mult"),
                 unit=("label_dropout", "dropout", "p_zero", "p_diag", "r_max", "adv_t_max"))
    B, R, world = cfg["batch"], cfg["resolution"], int(os.environ.get("WORLD_SIZE", cfg["gpus"]))
    batch_gpu = min(cfg["batch_gpu"] or B, max(B // world, 1))
    down = 2 ** (len(unet.PRESETS[cfg["preset"]]["channel_mult"]) - 1)   # the U-Net's total downsampling
    check_flags([
        (B % world or B // world % batch_gpu,
         f"--batch {B} must be divisible by {world} processes x --batch-gpu {batch_gpu}"),
        (cfg["p_zero"] + cfg["p_diag"] > 1, f"--p-zero {cfg['p_zero']} + --p-diag {cfg['p_diag']} exceeds 1"),
        (cfg["lam_min"] > cfg["lam_max"], f"--lam-min {cfg['lam_min']} is above --lam-max {cfg['lam_max']}"),
        (R % down, f"--resolution {R} must be a multiple of {down}: preset {cfg['preset']}'s U-Net halves it "
                   f"{down.bit_length() - 1} times"),
        (cfg["stage"] != "teacher" and cfg["jvp"] == "fd" and cfg["precision"] == "bf16",
         "--jvp fd with --precision bf16: the central difference divides bf16 rounding by 2h (relative "
         "gradient error 0.9 measured by bench.py); use --precision fp32 or --jvp exact")])
    check_device(cfg["device"], cfg["gpus"])
    check_writable(cfg["out"], "--out", folder=True)


def snapshot_file(path):
    """A run folder or a snapshot file -> the snapshot file."""
    path = Path(path)
    return path / "snapshot.pt" if path.is_dir() else path


def previous_file(path):
    """training-state.pt -> training-state-prev.pt: the file as the save before the last one left it."""
    return path.with_name(f"{path.stem}-prev{path.suffix}")


def digest(obj):
    """sha256 over every value of a (nested) checkpoint dict: tensors by name, dtype, shape and bytes."""
    h = hashlib.sha256()

    def walk(x, name):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}/{i}")
        else:
            h.update(f"{name}={x!r}".encode())
    walk({k: v for k, v in obj.items() if k != "sha256"}, "")
    return h.hexdigest()


def load_checked(path, keys=("config",)):
    """torch.load a checkpoint of ours and check it: whole (its sha256), the keys it must have, and
    finite floating-point tensors. Anything else is a UsageError naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no snapshot at {path}" + ("" if path.suffix else " (a run folder holds snapshot.pt)"))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)    # tensors read lazily
    except Exception as error:                                      # a 0-byte file, another format, a cut file
        why = str(error).splitlines()[0][:100] if str(error) else "empty or truncated"
        raise UsageError(f"not a checkpoint: {path} ({type(error).__name__}: {why})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise UsageError(f"not a checkpoint of train_imagenet.py: {path} (it needs the keys {', '.join(keys)})")
    bad = [name for name, t in tensors(data) if t.is_floating_point() and not torch.isfinite(t).all()]
    if "sha256" in data and digest(data) != data["sha256"]:
        problem = "is corrupt: its contents do not match the checksum written with it"
    elif bad:
        problem = f"has non-finite weights ({len(bad)} tensors, e.g. {bad[0]})"
    else:
        return data
    hint = "delete it to start over" if path.name == "training-state.pt" else "retrain or restore it"
    prev = previous_file(path)
    if prev.exists():
        try:
            hint = f"the previous one, {prev} of step {load_checked(prev)['step']}, is intact: move it here to use it"
        except UsageError:
            hint += f" ({prev} is damaged too)"
    raise UsageError(f"{path} {problem}; {hint}")


def tensors(obj, name=""):
    """(name, tensor) of every tensor in a nested dict / list."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{name}.{i}")


def read_config(path):
    """The config stored in a snapshot or training state, after checking the file (load_checked), or
    of an EDM2 network pickle (edm2.py)."""
    if edm2.is_edm2_pickle(path):                                       # EDM2's published networks
        return edm2.read_config(path)
    return load_checked(snapshot_file(path))["config"]


def img_channels(config):
    """The image channels C of a config's network: 1 for gray idx data, else 3. Configs written before
    gray data became 1 channel (and EDM2's) have no img_channels key: they are RGB."""
    return config.get("img_channels", 3)


def build_network(config):
    """The U-Net that a config describes (the preset's architecture, resolution, channels, classes, inputs)."""
    return unet.UNet(img_resolution=config["resolution"], img_channels=img_channels(config),
                     num_classes=config["num_classes"], cond_s=config["cond_s"], cond_lam=config["cond_lam"],
                     dropout=config["dropout"], numerics=config.get("numerics", "ayf"),
                     **unet.PRESETS[config["preset"]])


def load_snapshot(path, device="cpu"):
    """(network with the EMA weights in eval mode, config) from a run folder or snapshot.pt, checked, or
    from an EDM2 network pickle (edm2.py)."""
    if edm2.is_edm2_pickle(path):
        return edm2.load(path, device)
    path = snapshot_file(path)
    data = load_checked(path, keys=("config", "ema"))
    net = build_network(data["config"]).to(device)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in data["ema"].items()}
    if found != expected:
        differ = sorted(set(found.items()) ^ set(expected.items()))
        raise UsageError(f"{path}: its weights do not fit the network its config describes "
                         f"({len(differ)} names or shapes differ, e.g. {differ[0][0]}); it is damaged or "
                         f"from another version")
    net.load_state_dict(data["ema"])
    return net.eval().requires_grad_(False), data["config"]


def check_stage(config, stage, what):
    if config["stage"] != stage:
        raise UsageError(f"{what} was written by --stage {config['stage']} (preset {config['preset']}), "
                         f"but a --stage {stage} checkpoint is needed here")


def resolve_from_checkpoints(cfg):
    """Check --teacher, --guide and --init against the stage and each other, and take from them what
    the student inherits (preset, --init's guidance). Returns (teacher config, init config), or None."""
    stage = cfg["stage"]
    teacher_cfg = init_cfg = None
    check_flags([(stage != "adv" and cfg["init"] is not None, f"--init is for --stage adv, not --stage {stage}")]
                + [(stage == "teacher" and cfg[flag] is not None,
                    f"--{flag} is for --stage distill and adv, not --stage teacher")
                   for flag in ("teacher", "guide", "loss", "guidance")]
                + [(stage != "teacher" and cfg["teacher"] is None,
                    f"--stage {stage} needs --teacher (a teacher run folder or its snapshot.pt)"),
                   (stage == "adv" and cfg["init"] is None,
                    "--stage adv needs --init (a distill run folder or its snapshot.pt)")])
    if stage == "teacher":
        cfg.update(loss="fm", guidance=None, preset=cfg["preset"] or "S", numerics="ayf", t_min=0.0, t_max=1.0)
        return None, None
    if stage == "adv":
        init_cfg = read_config(cfg["init"])
        check_stage(init_cfg, "distill", f"--init {cfg['init']}")
        if cfg["guidance"] not in (None, init_cfg["guidance"]):     # it decides the lam input
            raise UsageError(f"--init {cfg['init']} was distilled with --guidance {init_cfg['guidance']}, "
                             f"but --guidance {cfg['guidance']} was given")
        cfg["guidance"] = init_cfg["guidance"]
    cfg.update(loss=cfg["loss"] or "emd", guidance=cfg["guidance"] or "auto")
    if (cfg["guidance"] == "auto") != (cfg["guide"] is not None):
        raise UsageError("--guidance auto needs --guide, and --guide is only used by --guidance auto")
    teacher_cfg = read_config(cfg["teacher"])
    check_stage(teacher_cfg, "teacher", f"--teacher {cfg['teacher']}")
    guide_cfg = read_config(cfg["guide"]) if cfg["guide"] is not None else None
    if guide_cfg:
        check_stage(guide_cfg, "teacher", f"--guide {cfg['guide']}")
    t, teacher = f"--teacher {cfg['teacher']}", (teacher_cfg["preset"], teacher_cfg["resolution"])
    check_flags([
        (cfg["preset"] not in (None, teacher[0]), f"the student has the teacher's preset: {t} is preset "
                                                  f"{teacher[0]!r}, but --preset {cfg['preset']!r} was given"),
        (cfg["resolution"] not in (None, teacher[1]),
         f"{t} has resolution {teacher[1]}, but --resolution {cfg['resolution']} was given"),
        (cfg["guidance"] == "cfg" and teacher_cfg["label_dropout"] == 0,
         f"--guidance cfg needs a teacher trained with label dropout; {t} was trained with --label-dropout 0"),
        (cfg["dropout"], "a distilled student must have --dropout 0 (a finite-difference JVP and the "
                         "trainable forward would draw different masks)"),
        (init_cfg and (init_cfg["preset"], init_cfg["resolution"]) != teacher,
         f"--init {cfg['init']} is preset {init_cfg and init_cfg['preset']!r} at "
         f"{init_cfg and init_cfg['resolution']}, {t} {teacher[0]!r} at {teacher[1]}"),
        (guide_cfg and guide_cfg["resolution"] != teacher[1],
         f"--guide {cfg['guide']} has resolution {guide_cfg and guide_cfg['resolution']}, {t} {teacher[1]}")])
    cfg["preset"] = teacher[0]
    # The teacher's numerics and time range (EDM2: t in [0.002, 80/81]) go to the student and its sampler.
    cfg.update(numerics=teacher_cfg.get("numerics", "ayf"), t_min=teacher_cfg.get("t_min", 0.0),
               t_max=teacher_cfg.get("t_max", 1.0))
    if cfg["loss"] == "lmd" and cfg["p_zero"] and cfg["t_min"] > 0:
        raise UsageError(f"--loss lmd evaluates the teacher at s, and {t} is defined only for t >= "
                         f"{cfg['t_min']:.4g}: drop --p-zero (its pairs have s = 0) or use --loss emd")
    return teacher_cfg, init_cfg


# Keys of a run's config that may change when it resumes: its length, where its files and processes
# are, how often it reports. Any other change makes another run: refused unless --force-resume, and
# NETWORK's changes always (the saved tensors would not fit).
MAY_CHANGE = ("kimg", "out", "device", "gpus", "batch_gpu", "status_kimg", "snapshot_kimg", "cache_dir",
              "dry_run", "force_resume", "forced_changes")
NETWORK = ("stage", "preset", "resolution", "img_channels", "guidance", "weighting", "num_classes", "cond_s",
           "cond_lam", "numerics")
PATHS = ("data", "teacher", "guide", "init")


def check_same_run(state, cfg, path, keys=None):
    """Resuming from a training state of another run is refused, naming the differences; with
    cfg["force_resume"] they are printed and recorded in cfg["forced_changes"] (so in config.json)."""
    saved = state["config"]
    if "forced_changes" in saved:                                   # the run's history goes on in config.json
        cfg.setdefault("forced_changes", saved["forced_changes"])
    def norm(k, v):
        return os.path.realpath(v) if k in PATHS and v not in (None, "synthetic") else v
    keys = [k for k in (keys or cfg) if k in saved and k in cfg and k not in MAY_CHANGE]
    differ = {k: f"{k}: {saved[k]!r} there, {cfg[k]!r} here" for k in keys if norm(k, saved[k]) != norm(k, cfg[k])}
    if not differ:
        return
    fixed = [k for k in differ if k in NETWORK]
    if fixed or not cfg.get("force_resume"):
        raise UsageError(f"{path} belongs to another run ({'; '.join(differ.values())}). Use another --out, "
                         f"delete it to start over" + ("" if fixed else ", or go on with --force-resume"))
    print(f"--force-resume: {path} goes on with {'; '.join(differ.values())}")
    cfg["forced_changes"] = cfg.get("forced_changes", []) + [f"step {state['step']}: " + "; ".join(differ.values())]


def distilled_weighting(path, device="cpu"):
    """The adaptive weighting head u(t, s) of a distill run (folder or snapshot.pt), for --stage adv to go
    on with: from the snapshot, or, for snapshots that predate it there, from the training state beside it."""
    weight = load_checked(snapshot_file(path)).get("weight")
    state_path = snapshot_file(path).parent / "training-state.pt"
    if weight is None and state_path.exists():
        weight = load_checked(state_path).get("weight")
    if weight is None:
        raise UsageError(f"--init {path} was distilled with --weighting adaptive, but neither its snapshot nor a "
                         f"training-state.pt beside it holds the weighting head; give the run folder or use "
                         f"--weighting none")
    return {k: v.to(device) for k, v in weight.items()}


# ----------------------------------------------------------------------------------------------
# Writing checkpoints.

class _RecordingFile(io.FileIO):
    """A file that remembers the OSError of a failed write: torch.save turns it into a RuntimeError
    that does not say why (a full disk reads 'unexpected pos 704 vs 598')."""
    error = None

    def write(self, data):
        try:
            return super().write(data)
        except OSError as error:
            self.error = error
            raise


def save_run(out, cfg, step, skipped, saved_step, **parts):
    """A training run's two files (train_imagenet.py's docstring): snapshot.pt {config, ema, step, weight} and
    training-state.pt {config, step, skipped, net, ema, optimizer, weight, disc, disc_optimizer}; a part that
    is None (weight without --weighting adaptive, disc* outside --stage adv) is saved as None."""
    states = {key: part.state_dict() if part is not None else None for key, part in parts.items()}
    save_atomic(dict(config=cfg, ema=states["ema"], step=step, weight=states["weight"]), out / "snapshot.pt",
                saved_step)
    save_atomic(dict(config=cfg, step=step, skipped=skipped, **states), out / "training-state.pt", saved_step)


def save_atomic(obj, path, previous_step=None):
    """torch.save obj with its sha256 through a temporary file of a unique name, so that an interrupted
    or failed save leaves the old file intact. previous_step: the step of the file it replaces, which
    then stays as *-prev.pt. A failed save removes its temporary file and says why (e.g. no space left
    on device), and what is intact."""
    path = Path(path)
    obj = dict(obj, sha256=digest(obj))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            with _RecordingFile(tmp, "w") as raw, io.BufferedWriter(raw, 1 << 20) as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(raw.fileno())
        except RuntimeError:
            if raw.error is None:                                   # not a write error: a bug, keep its traceback
                raise
            raise raw.error from None
        if previous_step is not None and path.exists():             # keep it as *-prev.pt (a hard link: no copy)
            try:
                os.link(path, f"{tmp}.prev")
                os.replace(f"{tmp}.prev", previous_file(path))
            except OSError:                                         # a file system without hard links: no -prev
                Path(f"{tmp}.prev").unlink(missing_ok=True)
        os.replace(tmp, path)
    except OSError as error:
        for leftover in (tmp, f"{tmp}.prev"):
            Path(leftover).unlink(missing_ok=True)
        kept = (f"the previous checkpoint of step {previous_step} is intact" if previous_step is not None
                else "the files already there are unchanged")
        reason = (error.strerror or str(error)).lower()
        fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
        raise UsageError(f"{reason} at {path}: {fix} and rerun (the same command resumes); {kept}") from None
    except BaseException:                                           # a bug, a KeyboardInterrupt: no leftover
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_bytes(*modules):
    """Bytes of one snapshot.pt (the EMA) and one training-state.pt (net, EMA, Adam's two moments)."""
    params = sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())
    return 5 * params + (1 << 20)


def data_fingerprint(images):
    """sha256 (16 hex digits) of the image count and 64 images spread over the data set (N, R, R, C)."""
    h = hashlib.sha256(str(images.shape).encode())
    for i in sorted(set(range(0, len(images), max(1, len(images) // 64)))):
        h.update(images[i].tobytes())
    return h.hexdigest()[:16]


def check_disk_space(out, needed):
    """Before training: room for the checkpoints at their largest (current, previous and a temporary
    copy of each), beyond what the run folder already holds."""
    held = sum(f.stat().st_size for f in out.glob("*.pt"))
    free = shutil.disk_usage(out).free
    if free + held < 3 * needed:
        raise UsageError(f"no space left on device for {out}: the checkpoints need {3 * needed / 2**30:.2f} GiB "
                         f"(current, previous, temporary), {(free + held) / 2**30:.2f} GiB are free; free "
                         f"space or pick another --out")


# ----------------------------------------------------------------------------------------------
# One run per folder.

class RunLock:
    """--out/run.lock holds "pid hostname" while a run uses the folder. A second run is refused; the
    lock of a process that no longer runs (killed, machine rebooted) is taken over with a note."""

    def __init__(self, out):
        self.path = Path(out) / "run.lock"
        self.mine = f"{os.getpid()} {socket.gethostname()}"

    def __enter__(self):
        self.created = not self.path.parent.exists()                # then a run that fails leaves no folder
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"run.lock.{os.getpid()}.tmp")
        tmp.write_text(self.mine + "\n")
        try:
            while True:
                try:
                    os.link(tmp, self.path)                         # atomic, and the lock is never half-written
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
        finally:
            tmp.unlink()

    def _take_over_if_stale(self):
        try:
            pid, host = self.path.read_text().split()
        except FileNotFoundError:                                   # released meanwhile: try again
            return
        if host != socket.gethostname():
            raise UsageError(f"{self.path.parent} is used by a run on {host} (pid {pid}); wait for it, use "
                             f"another --out, or delete {self.path} if that run is gone")
        if _alive(int(pid)):
            raise UsageError(f"{self.path.parent} is used by the running process {pid}; wait for it or "
                             f"use another --out")
        print(f"note: taking over {self.path} of process {pid}, which is no longer running")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc):
        if self.path.exists() and self.path.read_text().strip() == self.mine:
            self.path.unlink()
        if self.created and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def _alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                         # someone else's process
        return True
    return True
