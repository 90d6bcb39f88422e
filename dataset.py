"""ImageNet 64x64, MNIST digits (idx files) or a synthetic stand-in as one uint8 array, preprocessed
once and memory-mapped.

    ds = load_dataset(source, cache_dir=None, resolution=64, max_images=None, seed=0)
    x, onehot = get_batch(ds, indices, device)                  # (B, 3, R, R) in [-1, 1], (B, K)
    indices = batch_indices(step, global_batch, len(ds), seed)  # the same on every rank

Sources:
    an ImageNet train folder   one sub-folder per class (wnid), image files at any depth below it;
                               labels follow the sorted class-folder names
    npz batches                the downsampled ImageNet of Chrabaszcz et al. 2017: a folder of
                               train_data_batch_*.npz (or one such file), 'data' (N, 3*R*R) uint8 stored
                               as flattened CHW, 'labels' 1..1000
    MNIST idx files            a folder holding *-images-idx3-ubyte and *-labels-idx1-ubyte (each may be
                               .gz), or the images file itself (its labels file lies beside it); the
                               H x W grayscale images (28 x 28 for MNIST) are zero-padded to R x R,
                               centered (2 px a side at R = 32: exact pixels, no resampling, so a digit
                               keeps its strokes), and the gray value is copied to all 3 channels, so
                               that every model, loss and metric sees the same (R, R, 3) images as
                               for ImageNet; labels as stored (0-based), class names '0', '1', ...
    "synthetic"                512 generated images of 10 classes, in memory, for tests and CPU runs

A folder, npz or idx source is converted once into a cache folder, by default beside the source
(`/data/imagenet/train` -> `/data/imagenet/train-cache-64`; beside rather than inside, so the cache is
never mistaken for a class folder):

    images.npy      (N, R, R, 3) uint8   memory-mapped by every later run, nothing is decoded again
    labels.npy      (N,) int64           0-based class indices
    dataset.json    {"class_names", "source", "skipped"}, written last: it marks the cache complete

Every file is written under a temporary name and renamed into place, so an interrupted
preprocessing leaves no dataset.json and the next run starts over. Build the cache in one process
before a multi-process launch, e.g. `python dataset.py /data/imagenet/train`: ranks that all find no
cache would all start writing it, and preprocessing ImageNet takes far longer than a DDP barrier waits.
"""
import argparse
import functools
import gzip
import json
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from tqdm import tqdm

NPZ_NUM_CLASSES = 1000      # the downsampled-ImageNet npz batches always label 1..1000


@dataclass(repr=False)
class ImageDataset:
    """Images and labels as numpy arrays; for a cached source `images` is a read-only memmap."""
    images:         np.ndarray  # (N, R, R, 3) uint8
    labels:         np.ndarray  # (N,) int64, 0-based
    class_names:    list        # wnids for an ImageNet folder, 'class0', 'class1', ... otherwise

    @property
    def num_classes(self):
        return len(self.class_names)

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        N, H, W, _ = self.images.shape
        return f"ImageDataset({N} images of {H}x{W}, {self.num_classes} classes)"


def load_dataset(source, cache_dir=None, resolution=64, max_images=None, seed=0):
    """Returns an ImageDataset for an ImageNet folder, npz batches, or "synthetic" (see the module doc).

    cache_dir:  where the preprocessed arrays live; default `<source>-cache-<resolution>` beside the
                source. A complete cache is used as is: the source is then not even opened.
    max_images: keep only the first max_images images (a view: the cache always holds everything).
    seed:       only for "synthetic", which is generated from it.
    """
    if str(source) == "synthetic":
        ds = make_synthetic(resolution, seed)
    else:
        source = Path(source).expanduser().resolve()
        cache_dir = Path(cache_dir) if cache_dir else source.parent / f"{source.name}-cache-{resolution}"
        if not (cache_dir / "dataset.json").exists():
            _build_cache(source, cache_dir, resolution)
        ds = _load_cache(cache_dir, resolution)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        ds = ImageDataset(ds.images[:max_images], ds.labels[:max_images], ds.class_names)
    return ds


def get_batch(ds, indices, device):
    """Images scaled to [-1, 1] (channels first) and one-hot labels for the given dataset indices.

    indices: array-like of ints on the CPU (numpy, list or CPU tensor). The uint8 images travel to
    the device before conversion, a quarter of the bytes of float32.
    """
    indices = np.asarray(indices, dtype=np.int64)
    x = torch.from_numpy(ds.images[indices]).to(device)                 # (B, H, W, 3) uint8
    x = x.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1          # (B, 3, H, W) in [-1, 1]
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


def _decode_file(path, resolution):
    """Runs in a worker: returns (image, None), or (None, reason) for a file that cannot be decoded.

    PIL identifies the format from the content, so ImageNet's PNG named .JPEG decodes as a PNG;
    grayscale and CMYK JPEGs become RGB. Any failure is returned rather than raised, because one bad
    file must not end an hour of preprocessing, and the parent process names it in a warning.
    """
    try:
        with Image.open(path) as image:
            return preprocess_image(image.convert("RGB"), resolution), None
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------
# Building and loading the cache.

def _build_cache(source, cache_dir, resolution):
    """Converts an ImageNet folder or npz batches into cache_dir (layout in the module doc)."""
    if not source.exists():
        raise FileNotFoundError(f"dataset source not found: {source}")
    images_tmp = cache_dir / "images.tmp.npy"
    npz_files = _find_npz_batches(source)
    idx_files = _find_idx_files(source)
    if idx_files:
        labels = _convert_idx(*idx_files, images_tmp, resolution)
        meta = {"class_names": [str(k) for k in range(labels.max() + 1)], "skipped": []}
    elif npz_files:
        labels = _convert_npz(npz_files, images_tmp, resolution)
        meta = {"class_names": [f"class{k}" for k in range(NPZ_NUM_CLASSES)], "skipped": []}
    else:
        class_names, files, file_labels = _scan_image_folder(source)
        labels, skipped = _convert_images(files, file_labels, images_tmp, resolution)
        meta = {"class_names": class_names, "skipped": skipped}
    meta["source"] = str(source)

    # The order of the renames matters: dataset.json last, so it exists only for a complete cache.
    os.replace(images_tmp, cache_dir / "images.npy")
    np.save(cache_dir / "labels.tmp.npy", labels)
    os.replace(cache_dir / "labels.tmp.npy", cache_dir / "labels.npy")
    (cache_dir / "dataset.tmp.json").write_text(json.dumps(meta, indent=1))
    os.replace(cache_dir / "dataset.tmp.json", cache_dir / "dataset.json")


def _load_cache(cache_dir, resolution):
    """Memory-maps a complete cache, checking that it holds what was asked for."""
    meta = json.loads((cache_dir / "dataset.json").read_text())
    images = np.load(cache_dir / "images.npy", mmap_mode="r")          # (N, R, R, 3) uint8, not read
    labels = np.load(cache_dir / "labels.npy")                          # (N,) int64
    if images.dtype != np.uint8 or images.shape[1:] != (resolution, resolution, 3):
        raise ValueError(f"the cache in {cache_dir} holds {images.dtype} images of shape {images.shape[1:]}, "
                         f"not uint8 ({resolution}, {resolution}, 3) for resolution={resolution}; "
                         f"pass another cache_dir or delete this one to rebuild it")
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= len(meta["class_names"]):
        raise ValueError(f"the cache in {cache_dir} is inconsistent: {len(images)} images, labels of shape "
                         f"{labels.shape} in [{labels.min()}, {labels.max()}], {len(meta['class_names'])} "
                         f"classes; delete it to rebuild it")
    return ImageDataset(images, labels, meta["class_names"])


def _scan_image_folder(source):
    """Lists (class_names, files, labels) of an ImageNet-style folder, both in a deterministic order."""
    if not source.is_dir():
        raise ValueError(f"{source} is neither a folder of class sub-folders nor an npz batch file")
    class_names = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise ValueError(f"{source} has no class sub-folders (expected one per class, e.g. "
                         f"n01440764/) and no npz batches")
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = [Path(root, f) for root, _, names in os.walk(source / name, followlinks=True)
                 for f in names if not f.startswith(".")]
        files += sorted(found)
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"no image files under the {len(class_names)} class folders of {source}")
    return class_names, files, labels


def _convert_images(files, file_labels, images_tmp, resolution):
    """Decodes every file in parallel into images_tmp; returns (labels (N,) int64, skipped file names).

    The array has a row for every file, filled in order by the files that decode; if some do not,
    it is rewritten without the unused rows at the end.
    """
    rows = _create_images(images_tmp, len(files), resolution)
    labels, skipped = [], []
    decode = functools.partial(_decode_file, resolution=resolution)
    with Pool() as pool:
        results = pool.imap(decode, files, chunksize=64)
        for path, label, (image, error) in tqdm(zip(files, file_labels, results), total=len(files),
                                                 desc="preprocessing", unit="img"):
            if error is not None:
                warnings.warn(f"skipping unreadable image {path} ({error})")
                skipped.append(str(path))
                continue
            rows[len(labels)] = image
            labels.append(label)
    if not labels:
        raise ValueError(f"none of the {len(files)} files could be decoded as an image (first: {files[0]})")
    rows.flush()
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(files)} files that could not be decoded")
        compact = images_tmp.with_name("images.compact.tmp.npy")
        np.save(compact, rows[:len(labels)])                            # streams from the memmap
        os.replace(compact, images_tmp)
    return np.array(labels, dtype=np.int64), skipped


def _create_images(path, num_images, resolution):
    """A new (num_images, R, R, 3) uint8 .npy file, memory-mapped for writing; creates its folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the cache folder {path.parent} ({error}); "
                      f"pass cache_dir= to put it elsewhere") from error
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                     shape=(num_images, resolution, resolution, 3))


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
        if data.shape != (count, 3 * resolution * resolution):
            raise ValueError(f"{path}: 'data' has shape {data.shape}, expected ({count}, {3 * resolution ** 2}) "
                             f"for {resolution}x{resolution} images stored as flattened CHW")
        if batch_labels.min() < 1 or batch_labels.max() > NPZ_NUM_CLASSES:
            raise ValueError(f"{path}: labels must lie in 1..{NPZ_NUM_CLASSES}, found "
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
        raise ValueError(f"{path} cannot be decompressed ({error}); download it again") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()}, "
                         f"expected 0000 08 and the number of dimensions)")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(f"{path} holds {array.size} values, its header promises shape {shape}; "
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
            raise ValueError(f"{source} holds several idx image sets ({', '.join(p.name for p in found)}); "
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
    raise ValueError(f"no labels for {images}: expected {prefix}-labels-idx1-ubyte[.gz] beside it")


def _convert_idx(images_path, labels_path, images_tmp, resolution):
    """Grayscale idx images (N, H, W), zero-padded to (N, R, R) and copied to 3 channels, into
    images_tmp; returns labels (N,) int64. Padding keeps the pixels exact (no resampling)."""
    gray, labels = read_idx(images_path), read_idx(labels_path).astype(np.int64)
    if gray.ndim != 3 or labels.shape != (len(gray),):
        raise ValueError(f"{images_path} holds shape {gray.shape} and {labels_path} {labels.shape}; "
                         f"expected (N, H, W) images and (N,) labels")
    _, H, W = gray.shape
    pad_h, pad_w = resolution - H, resolution - W
    if min(pad_h, pad_w) < 0 or pad_h % 2 or pad_w % 2:
        raise ValueError(f"{images_path}: {H}x{W} images are zero-padded to the resolution, which must "
                         f"exceed each side by an even number of pixels (e.g. --resolution 32 for 28x28)")
    padded = np.pad(gray, ((0, 0), (pad_h // 2, pad_h // 2), (pad_w // 2, pad_w // 2)))    # (N, R, R)
    images = _create_images(images_tmp, len(gray), resolution)
    images[:] = padded[..., None]                                       # (N, R, R, 3), gray in every channel
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Preprocess an ImageNet folder, npz batches or idx files once.")
    parser.add_argument("source", help="ImageNet train folder, npz batch folder or file, idx folder or images file")
    parser.add_argument("--cache-dir", default=None, help="default: <source>-cache-<resolution> beside the source")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    print(load_dataset(args.source, cache_dir=args.cache_dir, resolution=args.resolution))
