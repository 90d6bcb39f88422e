"""ImageNet 64x64, MNIST digits (idx files) or a synthetic stand-in as one uint8 array, preprocessed
once and memory-mapped.

    ds = load_dataset(source, cache_dir=None, resolution=64, max_images=None, seed=0)
    x, onehot = get_batch(ds, indices, device)                  # (B, C, R, R) in [-1, 1], (B, K)
    indices = batch_indices(step, global_batch, len(ds), seed)  # the same on every rank

Every other source holds RGB images, C = 3 channels; idx files hold grayscale, C = 1 (ds.channels).

Sources:
    an ImageNet train folder   one sub-folder per class (wnid), image files at any depth below it;
                               labels follow the sorted class-folder names
    Tiny-ImageNet's val folder images/*.JPEG plus val_annotations.txt ("file<TAB>wnid<TAB>box");
                               labels follow the sorted wnids, as for the train folder
    npz batches                the downsampled ImageNet of Chrabaszcz et al. 2017: a folder of
                               train_data_batch_*.npz (or one such file), 'data' (N, 3*R*R) uint8 stored
                               as flattened CHW, 'labels' 1..1000
    MNIST idx files            a folder holding *-images-idx3-ubyte and *-labels-idx1-ubyte (each may be
                               .gz), or the images file itself (its labels file lies beside it); the
                               H x W grayscale images (28 x 28 for MNIST) are zero-padded to R x R,
                               centered (2 px a side at R = 32: exact pixels, no resampling, so a digit
                               keeps its strokes), stored as ONE channel, (R, R, 1): with the gray
                               value copied to 3 channels a generator could drift in color directions
                               no real image occupies (README); labels as stored (0-based), class
                               names '0', '1', ...
    "synthetic"                512 generated images of 10 classes, in memory, for tests and CPU runs

A folder, npz or idx source is converted once into a cache folder, by default beside the source
(`/data/imagenet/train` -> `/data/imagenet/train-cache-64`; beside rather than inside, so the cache is
never mistaken for a class folder):

    images.npy      (M, R, R, C) uint8   memory-mapped by every later run, nothing is decoded again;
                                         the first N rows are the images (M > N if some files failed)
    labels.npy      (N,) int64           0-based class indices
    dataset.json    {"class_names", "source", "skipped", "channels", "manifest"}, written last: it marks
                    the cache complete. The manifest summarizes the source files (per class folder or
                    batch file: count, bytes, a digest of names and sizes, one of modification times);
                    every load rescans the source (stat only, no decoding) and refuses a cache whose
                    source changed. A cache of another channel count than its source gets now (an idx
                    cache from when gray was copied to 3 channels; no "channels" means 3) is rebuilt.
    .lock           held (flock) by a process building the cache, shared by those loading it

The data is never silently wrong: a user's mistake raises DataError, a one-line message naming the
problem and the fix (the command-line tools print it and exit with code 2). That covers a missing or
unrecognized source, an empty one, a probably wrong layout (a split or `images` folder taken as a
class, images without class folders), a stale cache, and too little disk space for the cache.
Building is safe against interruption and concurrency: the builder holds the lock, writes under
names unique to its process, and renames dataset.json into place last, so a killed build leaves no
cache that looks complete, and a second process waits for the first one's cache and then uses it.
Still, build the cache in one process before a multi-process launch, e.g.
`python dataset.py /data/imagenet/train`: preprocessing ImageNet takes far longer than a DDP barrier
waits.
"""
import argparse
import collections
import contextlib
import errno
import fcntl
import functools
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tarfile
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from tqdm import tqdm

NPZ_NUM_CLASSES = 1000      # the downsampled-ImageNet npz batches always label 1..1000
NOT_DECODED = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF"}   # PIL names these formats but cannot read their pixels
IMAGE_SUFFIXES = {suffix for suffix, format in Image.registered_extensions().items()
                  if format in Image.OPEN and format not in NOT_DECODED}
LAYOUT_FOLDERS = {"images", "imgs", "train", "training", "val", "valid", "validation", "test", "testing"}


class DataError(ValueError):
    """A problem with the data the user pointed at (path, layout, cache, disk space); the message is
    one line that names the problem and the fix. The command-line tools print it and exit with 2."""


@dataclass(repr=False)
class ImageDataset:
    """Images and labels as numpy arrays; for a cached source `images` is a read-only memmap."""
    images:         np.ndarray  # (N, R, R, C) uint8, C = 1 (idx) or 3
    labels:         np.ndarray  # (N,) int64, 0-based
    class_names:    list        # wnids for an ImageNet folder, 'class0', 'class1', ... otherwise

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def channels(self):
        return self.images.shape[-1]

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        N, H, W, C = self.images.shape
        return f"ImageDataset({N} images of {H}x{W}x{C}, {self.num_classes} classes)"


def load_dataset(source, cache_dir=None, resolution=64, max_images=None, seed=0, rebuild_cache=False):
    """Returns an ImageDataset for an ImageNet folder, npz batches, or "synthetic" (see the module doc).

    cache_dir:     where the preprocessed arrays live; default `<source>-cache-<resolution>` beside the
                   source. A complete cache whose source is unchanged is used as is (nothing decoded).
    max_images:    keep only the first max_images images (a view: the cache always holds everything).
    seed:          only for "synthetic", which is generated from it.
    rebuild_cache: rebuild the cache even if it is complete (after the source changed).
    Raises DataError for a bad source, a wrong layout, a stale cache or too little disk space.
    """
    if max_images is not None and max_images < 1:
        raise DataError(f"max_images must be at least 1, got {max_images}")
    if str(source) == "synthetic":
        ds = make_synthetic(resolution, seed)
    else:
        source = Path(source).expanduser().resolve()
        cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else \
            source.parent / f"{source.name}-cache-{resolution}"
        if (source / "dataset.json").is_file():                     # a cache given as the source: use it
            source, cache_dir = Path(_read_meta(source)["source"]), source
        ds = _cached_dataset(source, cache_dir, resolution, rebuild_cache)
    if max_images is not None:
        ds = ImageDataset(ds.images[:max_images], ds.labels[:max_images], ds.class_names)
    return ds


def get_batch(ds, indices, device):
    """Images scaled to [-1, 1] (channels first) and one-hot labels for the given dataset indices.

    indices: array-like of ints on the CPU (numpy, list or CPU tensor). The uint8 images travel to
    the device before conversion, a quarter of the bytes of float32.
    """
    indices = np.asarray(indices, dtype=np.int64)
    x = torch.from_numpy(ds.images[indices]).to(device)                 # (B, H, W, C) uint8
    x = x.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1          # (B, C, H, W) in [-1, 1]
    labels = torch.from_numpy(ds.labels[indices]).to(device)            # (B,) int64
    onehot = nnf.one_hot(labels, ds.num_classes).float()                # (B, K)
    return x, onehot


def batch_indices(step, global_batch, num_images, seed):
    """The dataset indices of global batch number `step`, a pure function of (step, seed).

    The training stream is an endless sequence of epochs, each a fresh permutation seeded by
    (seed, epoch); batch `step` is positions [step * global_batch, (step + 1) * global_batch) of that
    stream and may straddle two epochs. Resuming at step k therefore replays the same batches, and
    every rank computes the same global batch and takes its own slice.
    """
    if global_batch < 1 or num_images < 1:
        raise ValueError(f"need global_batch >= 1 and num_images >= 1, got {global_batch} and {num_images}")
    position = step * global_batch + np.arange(global_batch, dtype=np.int64)   # (B,)
    epoch, offset = np.divmod(position, num_images)                            # (B,), (B,)
    indices = np.empty(global_batch, dtype=np.int64)
    for e in np.unique(epoch):
        in_epoch = epoch == e
        indices[in_epoch] = _epoch_permutation(num_images, seed, int(e))[offset[in_epoch]]
    return indices


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_images, seed, epoch):
    """The order of epoch `epoch`; cached because every step of an epoch needs the same one."""
    permutation = np.random.default_rng([seed, epoch]).permutation(num_images)
    permutation.flags.writeable = False
    return permutation


# ----------------------------------------------------------------------------------------------
# Preprocessing one image.

def preprocess_image(image, resolution):
    """ADM / EDM preprocessing (Dhariwal & Nichol 2021): a PIL RGB image -> (R, R, 3) uint8.

    Halve with a box filter while the smaller side is at least 2R (each halving averages 2x2 pixel
    blocks, which antialiases far better than one big resize), then resize with bicubic so the
    smaller side is exactly R, then crop the centre R x R square.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    pixels = np.asarray(image)                                          # (H, W, 3), min(H, W) == R
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return pixels[top:top + resolution, left:left + resolution]         # (R, R, 3)


def to_rgb(image):
    """Any PIL image -> 8-bit RGB with its full range kept.

    PIL's own convert("RGB") clips 16-bit pixels to 0..255, which turns a 16-bit PNG nearly white;
    here 16-bit (and 32-bit integer, which PIL uses for 16-bit PGM) grayscale is scaled by 255/65535.
    Float pixels have no standard range, so they are refused. Transparent pixels (RGBA, LA, PA, a
    palette or RGB with a transparent color) are composited over white: their stored color is
    arbitrary, often black. Grayscale, 1-bit, palette, CMYK and YCbCr convert as usual.
    """
    if image.mode.startswith("I"):                                      # I;16, I;16B, I;16L, I;16N, I
        pixels = np.asarray(image).astype(np.float64) * (255 / 65535)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("float pixels have no standard range; save the image with 8 or 16 bits")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _decode_file(path, resolution):
    """Runs in a worker: returns (image, short side), or (None, reason) for a file that cannot be decoded.

    PIL identifies the format from the content, so ImageNet's PNG named .JPEG decodes as a PNG. Any
    failure is returned rather than raised, because one bad file must not end an hour of
    preprocessing, and the parent process names it in a warning.
    """
    try:
        with Image.open(path) as image:
            return preprocess_image(to_rgb(image), resolution), min(image.size)
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------
# What a source holds, found without decoding anything; wrong layouts are refused here.

@dataclass
class SourceScan:
    """The files a folder, npz or idx source will be converted from, and what they mean."""
    kind:        str            # "folder", "annotated" (Tiny-ImageNet val), "npz" or "idx"
    files:       list           # the file paths (str or Path) to convert, in cache order
    groups:      list           # per file: its class (folder or wnid) or batch file name, for the manifest
    class_names: list = None    # None: from the labels (idx)
    labels:      list = None    # per file, 0-based (image sources only)
    extra:       list = field(default_factory=list)     # (group, Path) the labels come from
    notes:       list = field(default_factory=list)     # warnings to give when the cache is built

    @property
    def channels(self):
        """What the cache stores per pixel: 1 for grayscale idx images, 3 (RGB) for everything else."""
        return 1 if self.kind == "idx" else 3


def _scan_source(source):
    """SourceScan of an image folder, a Tiny-ImageNet val folder, npz batches or idx files; DataError otherwise."""
    try:
        return _scan_readable_source(source)
    except OSError as error:                                        # no permission, a symbolic link loop
        raise DataError(f"cannot read {error.filename} ({error.strerror}) in the dataset source {source}") from error


def _raise(error):                                                  # for os.walk, which would skip the folder silently
    raise error


def _scan_readable_source(source):
    if not source.exists():
        raise DataError(f"dataset source not found: {source} (expected an ImageNet train folder, npz batches, "
                        f"MNIST idx files or 'synthetic')")
    idx_files = _find_idx_files(source)
    if idx_files:
        return SourceScan("idx", list(idx_files), [path.name for path in idx_files])
    npz_files = _find_npz_batches(source)
    if npz_files:
        return SourceScan("npz", npz_files, [path.name for path in npz_files],
                          [f"class{k}" for k in range(NPZ_NUM_CLASSES)])
    if source.is_file() and (tarfile.is_tarfile(source) or zipfile.is_zipfile(source)):
        raise DataError(f"{source} is an archive, not npz batches with 'data' and 'labels' arrays; extract it "
                        f"and pass the folder it holds")
    if not source.is_dir():
        raise DataError(f"{source} is neither a folder of class sub-folders nor an npz batch or idx images file")
    if (source / "val_annotations.txt").is_file() and (source / "images").is_dir():
        return _scan_annotated_folder(source)
    return _scan_image_folder(source)


def _is_image_name(name):
    """By the name alone: hidden files (.DS_Store, macOS's ._x.jpg) and non-image suffixes are not."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _scan_image_folder(source):
    """One class per sub-folder, image files at any depth below it, both in a deterministic order."""
    top = sorted(os.scandir(source), key=lambda entry: entry.name)
    class_names = [entry.name for entry in top if entry.is_dir() and not entry.name.startswith(".")]
    loose = [entry.name for entry in top if entry.is_file() and _is_image_name(entry.name)]
    if not class_names:
        if loose:
            raise DataError(f"{source} holds {len(loose)} images but no class sub-folders; put each class's "
                            f"images in its own sub-folder (unlabelled images all in one)")
        raise DataError(f"{source} has no class sub-folders (expected one per class, e.g. n01440764/) "
                        f"and no npz batches")
    layout = [name for name in class_names if name.lower() in LAYOUT_FOLDERS]
    if layout:
        raise DataError(f"{source} would take its sub-folder{'s' * (len(layout) > 1)} {', '.join(layout)} as "
                        f"class{'es' * (len(layout) > 1)}, but such folders hold a split or loose images; point "
                        f"at the folder whose sub-folders are the classes (Tiny-ImageNet: train/, or val/ "
                        f"with its val_annotations.txt)")

    files, labels, empty, not_images = [], [], [], collections.Counter()
    for label, name in enumerate(class_names):
        found = []
        for root, folders, names in os.walk(source / name, onerror=_raise, followlinks=True):
            folders[:] = [folder for folder in folders if not folder.startswith(".")]
            for file_name in names:
                if _is_image_name(file_name):
                    found.append(os.path.join(root, file_name))                 # str: a Path costs 10x more
                else:
                    suffix = os.path.splitext(file_name)[1].lower()
                    not_images["hidden" if file_name.startswith(".") else suffix or "no suffix"] += 1
        files += sorted(found)
        labels += [label] * len(found)
        empty += [name] * (not found)
    if not files:
        raise DataError(f"no image files under the {len(class_names)} class folders of {source}"
                        + (f" ({_not_images_note(not_images)})" if not_images else ""))

    notes = [_not_images_note(not_images)] if not_images else []
    if loose:
        notes.append(f"ignored {len(loose)} images directly in {source}, outside the class folders")
    if empty:
        notes.append(f"{len(empty)} class folders hold no images (e.g. {empty[0]}); they still count as classes")
    if len(class_names) == 1:
        notes.append(f"{source} has a single class folder, {class_names[0]} ({len(files)} images): the model "
                     f"learns them as one class; if they belong to several, give each class its own sub-folder")
    return SourceScan("folder", files, [class_names[label] for label in labels], class_names, labels, notes=notes)


def _not_images_note(counts):
    kinds = ", ".join(f"{count} {kind}" for kind, count in counts.most_common(4))
    return f"skipped {sum(counts.values())} files that are not images by their name ({kinds}{', ...' * (len(counts) > 4)})"


def _scan_annotated_folder(source):
    """Tiny-ImageNet's val layout: images/*.JPEG, and val_annotations.txt lines 'file<TAB>wnid<TAB>box'.

    Labels follow the sorted wnids, the same order as the train folder's sorted class folders when
    every class appears (as in Tiny-ImageNet's val, 50 images each of all 200).
    """
    annotations = source / "val_annotations.txt"
    wnid_of = {}
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 and line.strip():
            raise DataError(f"{annotations} line {number} is not 'file<TAB>class<TAB>...': {line[:60]!r}")
        if line.strip():
            wnid_of[fields[0]] = fields[1]
    class_names = sorted(set(wnid_of.values()))
    present = sorted(name for name in os.listdir(source / "images") if _is_image_name(name))
    files = [source / "images" / name for name in present if name in wnid_of]
    if not files:
        raise DataError(f"none of the {len(present)} images in {source / 'images'} is named in {annotations}")
    notes = []
    if len(files) < len(present):
        notes.append(f"ignored {len(present) - len(files)} images in {source / 'images'} that {annotations.name} "
                     f"does not name")
    if len(files) < len(wnid_of):
        notes.append(f"{len(wnid_of) - len(files)} images named in {annotations} are missing")
    groups = [wnid_of[path.name] for path in files]
    labels = [class_names.index(wnid) for wnid in groups]
    return SourceScan("annotated", files, groups, class_names, labels, [(annotations.name, annotations)], notes)


def _find_npz_batches(source):
    """The npz batch files that `source` is or holds (recognized by content), in natural order."""
    def is_batch(path):
        if not (path.is_file() and zipfile.is_zipfile(path)):
            return False
        with zipfile.ZipFile(path) as archive:
            return {"data.npy", "labels.npy"} <= set(archive.namelist())

    def natural_key(path):   # train_data_batch_2 before train_data_batch_10
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]

    candidates = sorted(source.iterdir(), key=natural_key) if source.is_dir() else [source]
    return [path for path in candidates if is_batch(path)]


# ----------------------------------------------------------------------------------------------
# The manifest: what a cache was built from, compared on every load.

def _manifest(source, scan):
    """Per group (class or batch file): files, bytes, a digest of (name, size) and one of mtimes."""
    prefix = len(str(source if source.is_dir() else source.parent)) + 1        # of every path below it
    rows = collections.defaultdict(list)
    for group, path in list(zip(scan.groups, scan.files)) + scan.extra:
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:                                             # a broken link: decoding will name it
            size, mtime = -1, 0
        rows[group].append((str(path)[prefix:], size, mtime))
    return {group: {"files": len(entries), "bytes": sum(size for _, size, _ in entries),
                    "names_and_sizes": _digest(f"{name}\t{size}" for name, size, _ in entries),
                    "mtimes": _digest(str(mtime) for _, _, mtime in entries)}
            for group, entries in sorted(rows.items())}


def _digest(lines):
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _check_manifest(built, now, cache_dir, rebuild_hint, built_from):
    """Refuses a cache whose source gained, lost, renamed or resized files; warns on newer mtimes only
    (a copy without -p changes every mtime, so that alone is no proof of other pixels)."""
    added, removed = sorted(now.keys() - built.keys()), sorted(built.keys() - now.keys())
    common = sorted(built.keys() & now.keys())
    changed = [g for g in common if built[g]["names_and_sizes"] != now[g]["names_and_sizes"]]
    if added or removed or changed:
        parts = [f"new: {_some(added)}"] * bool(added) + [f"gone: {_some(removed)}"] * bool(removed)
        parts += [f"{g}: {built[g]['files']} files of {built[g]['bytes']} bytes when built, {now[g]['files']} of "
                  f"{now[g]['bytes']} now" for g in changed[:2]]
        parts += [f"{len(changed) - 2} more changed"] * (len(changed) > 2)
        raise DataError(f"the cache {cache_dir} is stale: its source {built_from} changed since it was built "
                        f"({'; '.join(parts)}); {rebuild_hint}")
    touched = [g for g in common if built[g]["mtimes"] != now[g]["mtimes"]]
    if touched:
        warnings.warn(f"files of {_some(touched)} have other modification times than when the cache {cache_dir} "
                      f"was built (same names and sizes); if images were edited in place, {rebuild_hint}")


def _some(names, shown=3):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# ----------------------------------------------------------------------------------------------
# Building and loading the cache.

def _cached_dataset(source, cache_dir, resolution, rebuild):
    """The cache of `source`: loaded if complete and current, built (under the lock) otherwise."""
    complete = cache_dir / "dataset.json"
    if not source.exists() and complete.exists() and not rebuild:
        warnings.warn(f"the dataset source {source} is gone; using its cache {cache_dir} without checking it")
        return _load_cache(cache_dir, resolution)
    scan = _scan_source(source)
    if scan.kind in ("folder", "annotated") and cache_dir.is_relative_to(source):
        raise DataError(f"the cache folder {cache_dir} lies inside the dataset source {source}, where it would "
                        f"be read as data; put it beside the source (the default) or elsewhere")
    manifest = _manifest(source, scan)
    hint = (f"rebuild it with `python dataset.py {source} --cache-dir {cache_dir} --resolution {resolution} "
            f"--rebuild-cache` or delete {cache_dir}")
    if complete.exists() and not rebuild:
        with _cache_lock(cache_dir, exclusive=False):
            if _has_layout(cache_dir, scan.channels):
                return _load_cache(cache_dir, resolution, manifest, hint)
    with _cache_lock(cache_dir, exclusive=True):
        if _has_layout(cache_dir, scan.channels) and not rebuild:  # built by another process meanwhile
            return _load_cache(cache_dir, resolution, manifest, hint)
        if complete.exists() and not rebuild:
            warnings.warn(f"rebuilding the cache {cache_dir}: it stores {_read_meta(cache_dir).get('channels', 3)} "
                          f"channels per pixel, this version {scan.channels} for {scan.kind} data")
        _build_cache(source, cache_dir, resolution, scan, manifest)
        return _load_cache(cache_dir, resolution)


def _has_layout(cache_dir, channels):
    """Whether cache_dir holds a complete cache of `channels` per pixel (caches that predate the
    "channels" key store 3, which an idx source no longer gets)."""
    return (cache_dir / "dataset.json").exists() and _read_meta(cache_dir).get("channels", 3) == channels


@contextlib.contextmanager
def _cache_lock(cache_dir, exclusive):
    """flock on cache_dir/.lock: exclusive to build, shared to load. The OS releases it when its
    process ends, however it ends, so a killed builder leaves no stale lock."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / ".lock", "a")
    except OSError as error:
        if exclusive:
            raise DataError(f"cannot write the cache folder {cache_dir} ({error.strerror}); pass --cache-dir "
                            f"to put it elsewhere") from error
        yield                                                       # a read-only cache: nobody builds it
        return
    with lock:
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(lock, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that holds the cache {cache_dir} (building it takes as long as "
                  f"preprocessing)", file=sys.stderr, flush=True)
            fcntl.flock(lock, operation)
        yield


def _build_cache(source, cache_dir, resolution, scan, manifest):
    """Converts the scanned source into cache_dir (layout in the module doc); the caller holds the lock.

    Files are written under names unique to this process and renamed into place, dataset.json last,
    so a failure at any point leaves no cache that looks complete, and nothing a rerun trips on.
    """
    for note in scan.notes:
        warnings.warn(note)
    (cache_dir / "dataset.json").unlink(missing_ok=True)           # an old cache stops being complete first
    for leftover in cache_dir.glob("*.tmp"):                        # a killed build's; the lock says it is dead
        leftover.unlink()
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    images_tmp, labels_tmp, meta_tmp = (cache_dir / f"{name}.{token}.tmp"
                                        for name in ("images.npy", "labels.npy", "dataset.json"))
    try:
        if scan.kind == "npz":
            labels, skipped = _convert_npz(scan.files, images_tmp, resolution), []
        elif scan.kind == "idx":
            labels, skipped = _convert_idx(*scan.files, images_tmp, resolution), []
        else:
            labels, skipped = _convert_images(scan.files, scan.labels, images_tmp, resolution)
        with open(labels_tmp, "wb") as file:
            np.save(file, labels)
        class_names = scan.class_names or [str(k) for k in range(labels.max() + 1)]
        meta = {"class_names": class_names, "source": str(source), "skipped": skipped, "channels": scan.channels,
                "manifest": manifest}
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(images_tmp, cache_dir / "images.npy")
        os.replace(labels_tmp, cache_dir / "labels.npy")
        os.replace(meta_tmp, cache_dir / "dataset.json")
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left on the device of {cache_dir} while writing the cache; free some "
                            f"space or pass --cache-dir on another disk") from error
        raise
    finally:
        for path in (images_tmp, labels_tmp, meta_tmp):
            path.unlink(missing_ok=True)


def _load_cache(cache_dir, resolution, manifest=None, rebuild_hint=None):
    """Memory-maps a complete cache, checking that it holds what was asked for and, given the
    source's manifest now, that the source has not changed since the cache was built."""
    meta = _read_meta(cache_dir)
    try:
        images = np.load(cache_dir / "images.npy", mmap_mode="r")      # (M, R, R, C) uint8, not read
        labels = np.load(cache_dir / "labels.npy")                      # (N,) int64, N <= M
    except (OSError, ValueError) as error:
        raise DataError(f"the cache in {cache_dir} is unreadable ({type(error).__name__}: {error}); "
                        f"delete it to rebuild it") from error
    if manifest is not None:
        if "manifest" in meta:
            _check_manifest(meta["manifest"], manifest, cache_dir, rebuild_hint, meta["source"])
        else:
            warnings.warn(f"the cache {cache_dir} has no manifest (built by an older version), so a change of "
                          f"its source goes unnoticed; {rebuild_hint}")
    C = meta.get("channels", 3)
    if images.dtype != np.uint8 or images.shape[1:] != (resolution, resolution, C):
        raise DataError(f"the cache in {cache_dir} holds {images.dtype} images of shape {images.shape[1:]}, "
                        f"not uint8 ({resolution}, {resolution}, {C}) for resolution={resolution}; "
                        f"pass another cache_dir or delete this one to rebuild it")
    if labels.ndim != 1 or not 0 < len(labels) <= len(images) or labels.min() < 0 \
            or labels.max() >= len(meta["class_names"]):
        raise DataError(f"the cache in {cache_dir} is inconsistent: {len(images)} images, labels of shape "
                        f"{labels.shape}, {len(meta['class_names'])} classes; delete it to rebuild it")
    return ImageDataset(images[:len(labels)], labels, meta["class_names"])


def _read_meta(cache_dir):
    try:
        return json.loads((cache_dir / "dataset.json").read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"the cache in {cache_dir} is unreadable ({type(error).__name__}: {error}); "
                        f"delete it to rebuild it") from error


def _convert_images(files, file_labels, images_tmp, resolution):
    """Decodes every file in parallel into images_tmp; returns (labels (N,) int64, skipped file names).

    The array has a row for every file, filled in order by the files that decode; rows left over by
    files that do not stay unused at the end (the loader takes the first N).
    """
    rows = _create_images(images_tmp, len(files), resolution)
    labels, skipped, upsampled = [], [], 0
    decode = functools.partial(_decode_file, resolution=resolution)
    with Pool() as pool:
        results = pool.imap(decode, files, chunksize=64)
        for path, label, (image, side_or_error) in tqdm(zip(files, file_labels, results), total=len(files),
                                                         desc="preprocessing", unit="img"):
            if image is None:
                warnings.warn(f"skipping unreadable image {path} ({side_or_error})")
                skipped.append(str(path))
                continue
            rows[len(labels)] = image
            labels.append(label)
            upsampled += side_or_error < resolution
    if not labels:
        raise DataError(f"none of the {len(files)} image files could be decoded (first: {files[0]})")
    rows.flush()
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(files)} image files that could not be decoded")
    if upsampled:      # e.g. 32x32 CIFAR at --resolution 64: blurry training data, probably not meant
        warnings.warn(f"upsampled {upsampled} of {len(labels)} images whose short side is below {resolution} "
                      f"pixels; for such data pass a smaller --resolution")
    return np.array(labels, dtype=np.int64), skipped


def _create_images(path, num_images, resolution, channels=3):
    """A new (num_images, R, R, C) uint8 .npy file, memory-mapped for writing, its disk blocks
    allocated up front: writing into a memory map on a full disk kills the process with SIGBUS,
    whereas a failed allocation is an ordinary error with a message."""
    need = num_images * resolution * resolution * channels
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise DataError(f"no space left: need {_size(need)} at {path.parent}, have {_size(free)}; free some space "
                        f"or pass --cache-dir on another disk")
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                       shape=(num_images, resolution, resolution, channels))
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:                                    # ENOSPC: a DataError in _build_cache
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    return images


def _size(num_bytes):
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _convert_npz(files, images_tmp, resolution):
    """Concatenates npz batches into images_tmp as (N, R, R, 3); returns labels (N,) int64, 0-based."""
    counts = []
    for path in files:
        with np.load(path) as batch:
            counts.append(len(batch["labels"]))
    images = _create_images(images_tmp, sum(counts), resolution)
    labels = np.empty(sum(counts), dtype=np.int64)
    start = 0
    for path, count in zip(tqdm(files, desc="converting npz batches", unit="file"), counts):
        with np.load(path) as batch:
            data, batch_labels = batch["data"], np.asarray(batch["labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.shape != (count, 3 * resolution * resolution):
            side = math.isqrt(data.shape[-1] // 3) if data.ndim == 2 else 0
            hint = f"; these are {side}x{side} images: pass --resolution {side}" if 3 * side ** 2 == data.shape[-1] \
                and side != resolution else ""
            raise DataError(f"{path}: 'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape "
                            f"({count}, {3 * resolution ** 2}) for {resolution}x{resolution} images stored as "
                            f"flattened CHW{hint}")
        if batch_labels.min() < 1 or batch_labels.max() > NPZ_NUM_CLASSES:
            raise DataError(f"{path}: labels must lie in 1..{NPZ_NUM_CLASSES}, found "
                            f"{batch_labels.min()}..{batch_labels.max()}")
        images[start:start + count] = data.reshape(count, 3, resolution, resolution).transpose(0, 2, 3, 1)
        labels[start:start + count] = batch_labels - 1
        start += count
    images.flush()
    return labels


# ----------------------------------------------------------------------------------------------
# MNIST-format idx files (LeCun et al.: a big-endian header, then the raw array).

IDX_DTYPES = {0x08: np.uint8}   # the type codes we read: MNIST stores unsigned bytes


def read_idx(path):
    """The array stored in an idx file, gzipped or not (recognized by content, not by name).

    Header: two zero bytes, a type code (0x08: uint8), the number of dimensions n, then n
    big-endian int32 sizes; the data follows in C order.
    """
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:                               # a damaged .gz
        raise DataError(f"{path} cannot be decompressed ({error}); download it again") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()}, "
                         f"expected 0000 08 and the number of dimensions)")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise DataError(f"{path} holds {array.size} values, its header promises shape {shape}; "
                         f"is the file truncated?")
    return array.reshape(shape)


def _find_idx_files(source):
    """(images file, labels file) if `source` is an idx images file or a folder holding one, else None."""
    pattern = re.compile(r"(.*)-images-idx3-ubyte(\.gz)?$")
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if pattern.match(p.name))
        if not found:
            return None
        if len({pattern.match(p.name).group(1) for p in found}) > 1:
            raise DataError(f"{source} holds several idx image sets ({', '.join(p.name for p in found)}); "
                             f"pass the images file you want as --data")
        images = found[0]
    elif pattern.match(source.name):
        images = source
    else:
        return None
    prefix = pattern.match(images.name).group(1)
    for name in (f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte"):
        if (images.parent / name).is_file():
            return images, images.parent / name
    raise DataError(f"no labels for {images}: expected {prefix}-labels-idx1-ubyte[.gz] beside it")


def _convert_idx(images_path, labels_path, images_tmp, resolution):
    """Grayscale idx images (N, H, W), zero-padded to (N, R, R, 1), into images_tmp; returns labels
    (N,) int64. Padding keeps the pixels exact (no resampling)."""
    gray, labels = read_idx(images_path), read_idx(labels_path).astype(np.int64)
    if gray.ndim != 3 or labels.shape != (len(gray),):
        raise DataError(f"{images_path} holds shape {gray.shape} and {labels_path} {labels.shape}; "
                         f"expected (N, H, W) images and (N,) labels")
    _, H, W = gray.shape
    pad_h, pad_w = resolution - H, resolution - W
    if min(pad_h, pad_w) < 0 or pad_h % 2 or pad_w % 2:
        raise DataError(f"{images_path}: {H}x{W} images are zero-padded to the resolution, which must "
                         f"exceed each side by an even number of pixels (e.g. --resolution 32 for 28x28)")
    padded = np.pad(gray, ((0, 0), (pad_h // 2, pad_h // 2), (pad_w // 2, pad_w // 2)))    # (N, R, R)
    images = _create_images(images_tmp, len(gray), resolution, channels=1)
    images[:] = padded[..., None]                                       # (N, R, R, 1)
    images.flush()
    return labels


# ----------------------------------------------------------------------------------------------
# Synthetic data.

PALETTE = np.array([                # one color per class (RGB, 0..255)
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
])


def make_synthetic(resolution=64, seed=0, num_images=512):
    """A small labelled image set that a class-conditional model can learn in minutes on a CPU.

    Class k is a shape in color PALETTE[k] (a disk for even k, a square for odd k) at a random
    position and size, over a gray gradient whose direction is set by k, plus Gaussian noise.
    Deterministic given (resolution, seed, num_images).
    """
    num_classes = len(PALETTE)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % num_classes).astype(np.int64)       # (N,), balanced
    yy, xx = np.meshgrid(np.linspace(-1, 1, resolution), np.linspace(-1, 1, resolution), indexing="ij")

    angle = 2 * np.pi * labels / num_classes                                            # (N,)
    ramp = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy       # (N, R, R)
    background = 100 + 40 * ramp                                                       # gray, 100 +- 57

    center = rng.uniform(-0.4, 0.4, size=(num_images, 2, 1, 1))
    radius = rng.uniform(0.3, 0.6, size=(num_images, 1, 1))
    dx, dy = np.abs(xx - center[:, 0]), np.abs(yy - center[:, 1])                       # (N, R, R)
    disk = np.hypot(dx, dy) <= radius
    square = np.maximum(dx, dy) <= radius
    inside = np.where((labels % 2 == 0)[:, None, None], disk, square)                   # (N, R, R)

    images = np.where(inside[..., None], PALETTE[labels][:, None, None, :], background[..., None])
    images = images + rng.normal(0, 8, size=images.shape)                               # (N, R, R, 3)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return ImageDataset(images, labels, [f"class{k}" for k in range(num_classes)])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Preprocess an ImageNet folder, npz batches or idx files once.")
    parser.add_argument("source", help="ImageNet train folder, Tiny-ImageNet val folder, npz batch folder or "
                                       "file, idx folder or images file")
    parser.add_argument("--cache-dir", default=None, help="default: <source>-cache-<resolution> beside the source")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rebuild-cache", action="store_true",
                        help="rebuild a complete cache, e.g. after images were added to the source")
    args = parser.parse_args(argv)
    try:
        print(load_dataset(args.source, cache_dir=args.cache_dir, resolution=args.resolution,
                           rebuild_cache=args.rebuild_cache))
    except DataError as error:
        print(f"dataset.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
