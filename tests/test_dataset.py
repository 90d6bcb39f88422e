"""dataset.py: preprocessing against independent computations, the cache, npz batches, batching.

Every test writes its own small data under tmp_path; nothing is downloaded.
"""
import gzip
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

import dataset
from dataset import batch_indices, get_batch, load_dataset, preprocess_image

CLASS_COLORS = {    # folder -> the solid color of its images; n01 is gray so it can hold the grayscale JPEG
    "n03000000": (200, 40, 40),
    "n01000000": (128, 128, 128),
    "n02000000": (40, 160, 220),
}


def solid(size, color, mode="RGB"):
    return Image.new("RGB", size, color).convert(mode)


def make_imagenet_folder(root):
    """A tiny ImageNet-like train folder with the real data set's quirks.

    Returns (readable files per class in sorted-path order, names of the files that must be skipped).
    Classes are created out of order; labels must still follow the sorted folder names.
    """
    readable = {name: [] for name in CLASS_COLORS}
    for name, color in CLASS_COLORS.items():
        for i, size in enumerate([(300, 200), (97, 181), (64, 64), (50, 40)]):   # wide, tall, exact, tiny
            path = root / name / f"sub{i % 2}" / "deeper" / f"{name}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            solid(size, color).save(path, quality=95)
            readable[name].append(path)
    quirks = [
        (root / "n01000000" / "gray.JPEG", solid((150, 100), CLASS_COLORS["n01000000"], "L"), "JPEG"),
        (root / "n03000000" / "cmyk.JPEG", solid((120, 160), CLASS_COLORS["n03000000"], "CMYK"), "JPEG"),
        (root / "n02000000" / "png.JPEG", solid((140, 130), CLASS_COLORS["n02000000"]), "PNG"),
    ]
    for path, image, format in quirks:
        image.save(path, format=format)
        readable[path.parent.name].append(path)

    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    truncated = root / "n02000000" / "truncated.JPEG"
    Image.fromarray(noise).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:4000])
    empty = root / "n03000000" / "sub0" / "empty.JPEG"
    empty.write_bytes(b"")
    return {name: sorted(paths) for name, paths in readable.items()}, ["truncated.JPEG", "empty.JPEG"]


def test_imagenet_folder(tmp_path):
    source = tmp_path / "train"
    readable, bad = make_imagenet_folder(source)
    with pytest.warns(UserWarning) as record:
        ds = load_dataset(source)
    messages = [str(w.message) for w in record]

    for name in bad:
        assert any(name in m for m in messages), f"no warning names {name}: {messages}"
    assert any("skipped 2 of" in m for m in messages)
    class_names = sorted(CLASS_COLORS)
    expected_labels = [k for k, name in enumerate(class_names) for _ in readable[name]]
    assert ds.class_names == class_names and ds.num_classes == 3
    assert len(ds) == len(expected_labels)
    assert ds.images.shape == (len(ds), 64, 64, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == expected_labels
    # Each image is its folder's solid color (up to JPEG error), so images and labels line up.
    colors = np.array([CLASS_COLORS[class_names[k]] for k in ds.labels])             # (N, 3)
    assert np.abs(ds.images.astype(int) - colors[:, None, None, :]).max() <= 4

    cache = tmp_path / "train-cache-64"
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "dataset.json", "images.npy", "labels.npy"]
    assert isinstance(ds.images, np.memmap)


def test_second_load_uses_cache(tmp_path, monkeypatch):
    source = tmp_path / "train"
    make_imagenet_folder(source)
    with pytest.warns(UserWarning):
        first = load_dataset(source, max_images=10)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened although the cache exists")
    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    second = load_dataset(source, max_images=10)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.class_names == second.class_names


def test_interrupted_preprocessing_is_redone(tmp_path, monkeypatch):
    source = tmp_path / "train"
    make_imagenet_folder(source)
    replace = os.replace

    def crash_on_labels(src, dst):     # dies after images.npy is in place, before the cache is complete
        if Path(dst).name == "labels.npy":
            raise RuntimeError("simulated crash")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_labels)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="simulated crash"):
        load_dataset(source)
    monkeypatch.setattr(os, "replace", replace)
    assert not (tmp_path / "train-cache-64" / "dataset.json").exists()

    with pytest.warns(UserWarning):
        rebuilt = load_dataset(source)
    with pytest.warns(UserWarning):
        fresh = load_dataset(source, cache_dir=tmp_path / "fresh")
    np.testing.assert_array_equal(rebuilt.images, fresh.images)
    np.testing.assert_array_equal(rebuilt.labels, fresh.labels)


def test_cache_with_other_resolution_is_an_error(tmp_path):
    source = tmp_path / "train"
    make_imagenet_folder(source)
    with pytest.warns(UserWarning):
        load_dataset(source, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="resolution=32"):
        load_dataset(source, cache_dir=tmp_path / "cache", resolution=32)


def test_missing_and_empty_sources(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(dataset.DataError, match="not found: .*no-such-folder"):
        load_dataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(dataset.DataError, match="no class sub-folders"):
        load_dataset(empty)
    (empty / "n01440764").mkdir()
    with pytest.raises(dataset.DataError, match="no image files"):
        load_dataset(empty)


# ----------------------------------------------------------------------------------------------
# Preprocessing one image, against independent computations.

@pytest.mark.parametrize("size", [(301, 173), (173, 301), (50, 40), (64, 300), (1000, 700)])
def test_constant_color_is_preserved(size):
    color = (37, 201, 90)
    out = preprocess_image(solid(size, color), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out == np.array(color, dtype=np.uint8)).all()


def test_box_halving_averages_2x2_blocks():
    rng = np.random.default_rng(0)
    means = rng.integers(3, 253, size=(64, 64, 3))                         # each 2x2 block's mean
    offsets = rng.permuted(np.broadcast_to([-3, -1, 1, 3], (64, 64, 3, 4)), axis=-1)
    blocks = (means[..., None] + offsets).reshape(64, 64, 3, 2, 2)          # integer means: no rounding
    pixels = blocks.transpose(0, 3, 1, 4, 2).reshape(128, 128, 3).astype(np.uint8)
    expected = pixels.reshape(64, 2, 64, 2, 3).astype(float).mean(axis=(1, 3))
    np.testing.assert_array_equal(preprocess_image(Image.fromarray(pixels), 64), expected)


@pytest.mark.parametrize("wide", [True, False])
def test_center_crop(wide):
    # 256 x 128 in quarters red | green | green | blue: after one halving (128 x 64) the centre
    # 64 columns are exactly the green half.
    stripes = np.zeros((128, 256, 3), dtype=np.uint8)
    stripes[:, :64] = (255, 0, 0)
    stripes[:, 64:192] = (0, 255, 0)
    stripes[:, 192:] = (0, 0, 255)
    image = Image.fromarray(stripes if wide else stripes.transpose(1, 0, 2).copy())
    out = preprocess_image(image, 64)
    assert (out == np.array([0, 255, 0], dtype=np.uint8)).all()


# ----------------------------------------------------------------------------------------------
# Downsampled-ImageNet npz batches.

def write_npz_batch(path, images_hwc, labels_1based):
    data = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)  # (n, 3*R*R), flattened CHW
    np.savez(path, data=data, labels=list(labels_1based), mean=data.mean(axis=0))


def test_npz_batches(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 64, 64, 3), dtype=np.uint8)
    images[0, 5, 9] = (11, 22, 33)                                          # row 5, column 9
    labels = np.array([1, 1000, 3, 4, 5, 6, 7])
    source = tmp_path / "Imagenet64_train_npz"
    source.mkdir()
    write_npz_batch(source / "train_data_batch_2.npz", images[:4], labels[:4])
    write_npz_batch(source / "train_data_batch_10.npz", images[4:], labels[4:])   # natural order: 2 < 10
    (source / "README.txt").write_text("not a batch")

    ds = load_dataset(source)
    np.testing.assert_array_equal(ds.images, images)
    assert ds.images[0, 5, 9].tolist() == [11, 22, 33]
    assert ds.labels.tolist() == (labels - 1).tolist()
    assert ds.num_classes == 1000 and ds.class_names[:2] == ["class0", "class1"]

    single = load_dataset(source / "train_data_batch_10.npz")
    np.testing.assert_array_equal(single.images, images[4:])


def test_npz_errors(tmp_path):
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    write_npz_batch(tmp_path / "zero.npz", images, [0, 5])
    with pytest.raises(ValueError, match="1..1000"):
        load_dataset(tmp_path / "zero.npz")
    write_npz_batch(tmp_path / "small.npz", images[:, :32, :32], [1, 2])
    with pytest.raises(ValueError, match="small.npz.*32x32 images: pass --resolution 32"):
        load_dataset(tmp_path / "small.npz")
    np.savez(tmp_path / "float.npz", data=np.zeros((2, 3 * 64 * 64)), labels=[1, 2])
    with pytest.raises(ValueError, match="'data' is float64"):                   # not cast to uint8 silently
        load_dataset(tmp_path / "float.npz")


# ----------------------------------------------------------------------------------------------
# Synthetic data, batching.

def test_synthetic():
    ds = load_dataset("synthetic")
    again = load_dataset("synthetic")
    other = load_dataset("synthetic", seed=1)
    assert ds.images.shape == (512, 64, 64, 3) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and np.bincount(ds.labels).tolist() == [512 // 10 + (k < 2) for k in range(10)]
    np.testing.assert_array_equal(ds.images, again.images)
    assert not np.array_equal(ds.images, other.images)
    class_means = np.stack([ds.images[ds.labels == k].mean(axis=(0, 1, 2)) for k in range(10)])   # (10, 3)
    assert np.abs(class_means[:, None] - class_means[None]).sum(-1)[~np.eye(10, dtype=bool)].min() > 5
    assert len(load_dataset("synthetic", max_images=100, resolution=32).images) == 100


@pytest.mark.parametrize("num_images, batch", [(12, 4), (10, 4), (5, 8)])
def test_batch_indices(num_images, batch):
    steps = -(-3 * num_images // batch)                                     # enough for 3 epochs
    stream = np.concatenate([batch_indices(step, batch, num_images, seed=3) for step in range(steps)])
    assert stream.dtype == np.int64
    epochs = [stream[e * num_images:(e + 1) * num_images] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(num_images))           # a permutation per epoch
    assert not np.array_equal(epochs[0], epochs[1])

    dataset._epoch_permutation.cache_clear()                                # a resumed process
    last = steps - 1
    np.testing.assert_array_equal(batch_indices(last, batch, num_images, seed=3), stream[last * batch:])
    assert not np.array_equal(batch_indices(0, num_images, num_images, seed=4), epochs[0])


def test_get_batch():
    ds = load_dataset("synthetic", max_images=64)
    indices = batch_indices(0, 16, len(ds), seed=0)
    x, onehot = get_batch(ds, indices, "cpu")
    assert ds.channels == 3 and x.shape == (16, 3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    expected = torch.from_numpy(ds.images[indices].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    torch.testing.assert_close(x, expected)
    assert onehot.shape == (16, 10) and onehot.dtype == torch.float32
    assert (onehot.sum(1) == 1).all() and onehot.argmax(1).tolist() == ds.labels[indices].tolist()


# ----------------------------------------------------------------------------------------------
# MNIST-format idx files.

def write_idx(path, array, gz):
    """An idx file written from the format's definition: 0x0000, type 0x08 (uint8), ndim, big-endian sizes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_digits(n=5, seed=0):
    rng = np.random.default_rng(seed)
    gray = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)            # no zeros: padding is visible
    return gray, rng.permutation(np.arange(n) % 10).astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder(tmp_path, gz):
    gray, labels = make_digits()
    source = tmp_path / "mnist"
    source.mkdir()
    suffix = ".gz" if gz else ""
    write_idx(source / f"t10k-images-idx3-ubyte{suffix}", gray, gz)
    write_idx(source / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)

    ds = load_dataset(source, resolution=32)
    assert ds.images.shape == (5, 32, 32, 1) and ds.channels == 1 and ds.num_classes == labels.max() + 1
    assert ds.class_names[:3] == ["0", "1", "2"] and ds.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(ds.images[:, 2:30, 2:30, 0], gray)       # exact pixels, 2 px from each side
    border = np.ones((32, 32), dtype=bool)
    border[2:30, 2:30] = False
    assert (ds.images[:, border] == 0).all()
    x, onehot = get_batch(ds, [0], "cpu")
    assert x.shape == (1, 1, 32, 32) and x[0, :, 0, 0].tolist() == [-1.0]   # zero padding is black, -1
    assert json.loads((tmp_path / "mnist-cache-32" / "dataset.json").read_text())["channels"] == 1


def test_idx_cache_of_three_channels_is_rebuilt(tmp_path):
    """A cache written when idx gray was copied to 3 channels (no "channels" in dataset.json) is not
    reused as it is: it is rebuilt as 1 channel, with a warning."""
    gray, labels = make_digits(3)
    write_idx(tmp_path / "a-images-idx3-ubyte", gray, gz=False)
    write_idx(tmp_path / "a-labels-idx1-ubyte", labels, gz=False)
    cache = tmp_path / "cache"
    load_dataset(tmp_path / "a-images-idx3-ubyte", cache_dir=cache, resolution=28)
    np.save(cache / "images.npy", np.repeat(gray[..., None], 3, axis=-1))          # (N, 28, 28, 3): the old layout
    meta = json.loads((cache / "dataset.json").read_text())
    del meta["channels"]
    (cache / "dataset.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="rebuilding the cache .* stores 3 channels per pixel, this version 1"):
        ds = load_dataset(tmp_path / "a-images-idx3-ubyte", cache_dir=cache, resolution=28)
    assert ds.images.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(ds.images[..., 0], gray)
    assert json.loads((cache / "dataset.json").read_text())["channels"] == 1


def test_idx_images_file_and_gzip_by_content(tmp_path):
    gray, labels = make_digits(3, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte", gray, gz=True)         # gzipped without the .gz name
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", gray[:1], gz=False)    # another set beside it
    ds = load_dataset(tmp_path / "train-images-idx3-ubyte", cache_dir=tmp_path / "cache", resolution=28)
    np.testing.assert_array_equal(ds.images[..., 0], gray)                 # resolution 28: no padding
    with pytest.raises(ValueError, match="several idx image sets"):
        load_dataset(tmp_path, cache_dir=tmp_path / "cache2", resolution=32)


def test_idx_errors(tmp_path):
    gray, labels = make_digits(2)
    write_idx(tmp_path / "a-images-idx3-ubyte", gray, gz=False)
    with pytest.raises(ValueError, match="a-labels-idx1-ubyte"):
        load_dataset(tmp_path / "a-images-idx3-ubyte", resolution=32)
    write_idx(tmp_path / "a-labels-idx1-ubyte", labels, gz=False)
    with pytest.raises(ValueError, match="--resolution 32"):
        load_dataset(tmp_path / "a-images-idx3-ubyte", cache_dir=tmp_path / "c1", resolution=31)
    with pytest.raises(ValueError, match="--resolution 32"):
        load_dataset(tmp_path / "a-images-idx3-ubyte", cache_dir=tmp_path / "c2", resolution=16)
    path = tmp_path / "b-images-idx3-ubyte"
    path.write_bytes((tmp_path / "a-images-idx3-ubyte").read_bytes()[:-10])
    write_idx(tmp_path / "b-labels-idx1-ubyte", labels, gz=False)
    with pytest.raises(ValueError, match="truncated"):
        load_dataset(path, cache_dir=tmp_path / "c3", resolution=32)
    write_idx(tmp_path / "c-labels-idx1-ubyte", labels, gz=False)
    (tmp_path / "c-images-idx3-ubyte").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(ValueError, match="cannot be decompressed"):
        load_dataset(tmp_path / "c-images-idx3-ubyte", cache_dir=tmp_path / "c4", resolution=32)
