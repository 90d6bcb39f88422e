"""dataset.py against the faults of issue 11: concurrent builds, a stale cache, wrong layouts,
non-image files, 16-bit and transparent images, a full disk, bad paths.

Every test writes its own small data under tmp_path (16x16 caches, so they stay fast).
"""
import collections
import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import DataError, load_dataset, to_rgb

REPO = Path(__file__).resolve().parents[1]
R = 16                                                  # cache resolution of these tests
COLORS = {"n01000000": (200, 40, 40), "n02000000": (40, 160, 220), "n03000000": (30, 200, 60)}


def make_folder(root, per_class=4, colors=COLORS):
    """A class-per-folder source of solid-color PNGs (lossless, so colors are exact)."""
    for name, color in colors.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (24 + i, 20), color).save(root / name / f"{name}_{i}.png")
    return root


def expected_colors(ds):
    return np.array([COLORS[ds.class_names[k]] for k in ds.labels])[:, None, None, :]     # (N, 1, 1, 3)


def load_quietly(source, **kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = load_dataset(source, resolution=R, **kwargs)
    return ds, [str(w.message) for w in record]


# ----------------------------------------------------------------------------------------------
# Concurrent builds.

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import dataset
    source, flag, release = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    if sys.argv[4] == "first":                      # hold the lock, once taken, until the test releases it
        create = dataset._create_images
        def held_create(*args):
            flag.write_text("building")
            while not release.exists():
                time.sleep(0.05)
            return create(*args)
        dataset._create_images = held_create
    ds = dataset.load_dataset(source, resolution=16)
    print(len(ds), int(ds.images.min()), int(ds.images.max()))
""")


def test_two_processes_building_one_cache(tmp_path):
    source = make_folder(tmp_path / "train", per_class=30)
    flag, release = tmp_path / "flag", tmp_path / "release"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = lambda role: subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(flag), str(release), role],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run("first")
    while not flag.exists() and first.poll() is None:                         # the first one holds the lock
        time.sleep(0.05)
    second = run("second")
    waiting = second.stderr.readline()                                          # blocks until it says something
    release.write_text("go")
    (out1, err1), (out2, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert "waiting for another process" in waiting                             # the second one waited for it
    assert out1 == out2 == "90 30 220\n"                                        # nobody saw black (0) rows
    ds, _ = load_quietly(source)
    assert (ds.images == expected_colors(ds)).all()
    assert sorted(p.name for p in (tmp_path / "train-cache-16").iterdir()) == \
        [".lock", "dataset.json", "images.npy", "labels.npy"]


def test_a_killed_builds_leftovers_are_removed(tmp_path):
    source = make_folder(tmp_path / "train")
    cache = tmp_path / "train-cache-16"
    cache.mkdir()
    (cache / "images.npy.4242-deadbeef.tmp").write_bytes(b"\0" * 100)    # a killed build's temp file
    ds, _ = load_quietly(source)
    assert (ds.images == expected_colors(ds)).all()
    assert not list(cache.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# Stale cache.

def test_stale_cache_is_refused_then_rebuilt(tmp_path):
    source = make_folder(tmp_path / "train")
    assert len(load_quietly(source)[0]) == 12
    Image.new("RGB", (30, 30), COLORS["n02000000"]).save(source / "n02000000" / "added.png")
    with pytest.raises(DataError, match=r"stale.*n02000000: 4 files of \d+ bytes when built, 5 of .*--rebuild-cache"):
        load_dataset(source, resolution=R)
    ds, _ = load_quietly(source, rebuild_cache=True)
    assert len(ds) == 13 and (ds.images == expected_colors(ds)).all()

    make_folder(source, colors={"n04000000": (1, 2, 3)})                 # a new class
    with pytest.raises(DataError, match="new: n04000000"):
        load_dataset(source, resolution=R)
    shutil.rmtree(source / "n04000000")
    (source / "n01000000" / "n01000000_0.png").unlink()
    with pytest.raises(DataError, match="n01000000: 4 files"):
        load_dataset(source, resolution=R)


def test_touched_files_warn(tmp_path):
    source = make_folder(tmp_path / "train")
    load_quietly(source)
    os.utime(source / "n03000000" / "n03000000_1.png", ns=(10**18, 10**18))
    ds, messages = load_quietly(source)
    assert len(ds) == 12 and any("modification times" in m and "n03000000" in m for m in messages)


def test_npz_cache_is_checked_too(tmp_path):
    data = np.zeros((2, 3 * R * R), dtype=np.uint8)
    np.savez(tmp_path / "batch_1.npz", data=data, labels=[1, 2])
    load_dataset(tmp_path / "batch_1.npz", resolution=R)
    np.savez(tmp_path / "batch_1.npz", data=np.zeros((3, 3 * R * R), dtype=np.uint8), labels=[1, 2, 3])
    with pytest.raises(DataError, match="stale.*batch_1.npz"):
        load_dataset(tmp_path / "batch_1.npz", resolution=R)


def test_idx_cache_is_checked_too(tmp_path):
    def write_idx(path, array):                         # header: 0x0000, uint8 (0x08), ndim, big-endian sizes
        path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
                         + array.astype(np.uint8).tobytes())
    source = tmp_path / "mnist"
    source.mkdir()
    write_idx(source / "a-images-idx3-ubyte", np.ones((2, 16, 16)))
    write_idx(source / "a-labels-idx1-ubyte", np.array([0, 1]))
    assert len(load_dataset(source, resolution=R)) == 2
    write_idx(source / "a-labels-idx1-ubyte", np.array([0, 1, 1]))
    with pytest.raises(DataError, match="stale.*a-labels-idx1-ubyte: 1 files of 10 bytes when built, 1 of 11"):
        load_dataset(source, resolution=R)


def test_a_cache_without_its_source_is_used(tmp_path):
    source = make_folder(tmp_path / "train")
    load_quietly(source)
    shutil.rmtree(source)
    ds, messages = load_quietly(source)
    assert len(ds) == 12 and any("is gone" in m for m in messages)


# ----------------------------------------------------------------------------------------------
# Layouts.

def test_tiny_imagenet_val_layout_reads_its_annotations(tmp_path):
    val = tmp_path / "val"
    (val / "images").mkdir(parents=True)
    wnids = ["n03000000", "n01000000", "n02000000", "n01000000"]
    lines = []
    for i, wnid in enumerate(wnids):
        Image.new("RGB", (20, 20), COLORS[wnid]).save(val / "images" / f"val_{i}.JPEG", format="PNG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    Image.new("RGB", (20, 20)).save(val / "images" / "unlisted.JPEG", format="PNG")
    ds, messages = load_quietly(val)
    assert ds.class_names == sorted(COLORS) and ds.labels.tolist() == [2, 0, 1, 0]
    assert (ds.images == expected_colors(ds)).all()
    assert any("ignored 1 images" in m for m in messages)


@pytest.mark.parametrize("folders, match", [
    (["train", "val", "test"], "sub-folders test, train, val as classes"),   # Tiny-ImageNet's root
    (["images"], "sub-folder images as class"),                             # val/ without annotations
    (["n01000000", "val"], "sub-folder val as class"),
])
def test_split_or_images_folder_as_a_class_is_refused(tmp_path, folders, match):
    source = make_folder(tmp_path / "data", colors={name: (9, 9, 9) for name in folders})
    with pytest.raises(DataError, match=match):
        load_dataset(source, resolution=R)


def test_flat_folder_is_refused(tmp_path):
    source = tmp_path / "flat"
    source.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20)).save(source / f"{i}.png")
    with pytest.raises(DataError, match="holds 3 images but no class sub-folders"):
        load_dataset(source, resolution=R)


def test_single_class_and_loose_images_warn(tmp_path):
    source = make_folder(tmp_path / "data", colors={"n01000000": COLORS["n01000000"]})
    Image.new("RGB", (20, 20)).save(source / "stray.png")
    ds, messages = load_quietly(source)
    assert ds.num_classes == 1 and len(ds) == 4
    assert any("single class folder, n01000000 (4 images)" in m for m in messages)
    assert any("ignored 1 images directly in" in m for m in messages)


def test_non_image_files_are_counted_once(tmp_path):
    source = make_folder(tmp_path / "train")
    (source / "n01000000" / "n01000000_boxes.txt").write_text("0 0 1 1")
    (source / "n01000000" / "meta.json").write_text("{}")
    (source / "n02000000" / ".DS_Store").write_bytes(b"\0\1")
    (source / "n02000000" / "._n02000000_0.png").write_bytes(b"\0\5\26\7")   # macOS metadata, not a PNG
    (source / "n03000000" / "broken.png").write_bytes(b"not a png")
    ds, messages = load_quietly(source)
    assert len(ds) == 12
    about_non_images = [m for m in messages if "not images" in m]
    assert about_non_images == ["skipped 4 files that are not images by their name (2 hidden, 1 .txt, 1 .json)"]
    assert [m for m in messages if "unreadable" in m] == [m for m in messages if "broken.png" in m]
    assert len([m for m in messages if "unreadable" in m]) == 1


def test_broken_link_is_an_unreadable_image(tmp_path):
    source = make_folder(tmp_path / "train")
    (source / "n01000000" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    ds, messages = load_quietly(source)
    assert len(ds) == 12 and any("unreadable image" in m and "gone.png" in m for m in messages)


def test_small_images_are_upsampled_with_a_warning(tmp_path):
    source = make_folder(tmp_path / "train")                                    # 24..27 x 20 pixels
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_dataset(source, resolution=32)
    assert any("upsampled 12 of 12 images whose short side is below 32" in str(w.message) for w in record)
    assert not any("upsampled" in m for m in load_quietly(source)[1])         # R = 16: none


def test_a_cache_given_as_the_source(tmp_path):
    source = make_folder(tmp_path / "train")
    built, _ = load_quietly(source)
    ds, messages = load_quietly(tmp_path / "train-cache-16")
    np.testing.assert_array_equal(ds.images, built.images)
    Image.new("RGB", (30, 30)).save(source / "n01000000" / "added.png")
    with pytest.raises(DataError, match="stale"):                              # still checked against its source
        load_dataset(tmp_path / "train-cache-16", resolution=R)


def test_cache_inside_the_source_is_refused(tmp_path):
    source = make_folder(tmp_path / "train")
    with pytest.raises(DataError, match="inside the dataset source"):
        load_dataset(source, cache_dir=source / "cache", resolution=R)


# ----------------------------------------------------------------------------------------------
# Pixel modes.

def test_16_bit_gradient_becomes_the_8_bit_gradient(tmp_path):
    gradient16 = np.tile(np.arange(256, dtype=np.uint16) * 257, (4, 1))        # 0..65535 in 256 steps
    for suffix in ("png", "pgm", "tif"):                                         # I;16, I, I;16
        path = tmp_path / f"gradient.{suffix}"
        Image.fromarray(gradient16).save(path)
        with Image.open(path) as image:
            rgb = np.asarray(to_rgb(image))
        assert rgb.shape == (4, 256, 3)
        np.testing.assert_array_equal(rgb, np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (4, 256, 3)))


def test_16_bit_folder_is_not_white(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 20000, dtype=np.uint16)).save(tmp_path / "train" / "a" / "dark.png")
    ds, _ = load_quietly(tmp_path / "train")
    assert (ds.images == round(20000 * 255 / 65535)).all()                     # 78, not 255


def test_transparency_over_white_and_other_modes():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(to_rgb(rgba))
    assert out[0, 0].tolist() == [10, 20, 30] and (out.reshape(-1, 3)[1:] == 255).all()
    half = np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 128))))
    assert (np.abs(half.astype(int) - 127) <= 1).all()                        # black at alpha 1/2 over white
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0                                            # index 0 is transparent
    assert np.asarray(to_rgb(palette)).reshape(-1, 3).tolist() == [[255] * 3] * 3 + [[200, 0, 0]]
    assert np.asarray(to_rgb(Image.new("1", (2, 2), 1))).min() == 255
    with pytest.raises(ValueError, match="float pixels"):
        to_rgb(Image.new("F", (2, 2), 0.5))


# ----------------------------------------------------------------------------------------------
# A full disk.

def no_leftovers(cache):
    return not (cache / "dataset.json").exists() and not list(cache.glob("*.tmp"))


def test_too_little_space_is_refused_before_writing(tmp_path, monkeypatch):
    source = make_folder(tmp_path / "train")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DataError, match=r"no space left: need 0\.0 MiB at .*train-cache-16, have 0\.0 MiB"):
        load_dataset(source, resolution=R)
    assert no_leftovers(tmp_path / "train-cache-16")


@pytest.mark.parametrize("failing", ["allocate", "labels"])
def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, failing):
    source = make_folder(tmp_path / "train")
    full = OSError(errno.ENOSPC, "No space left on device")
    if failing == "allocate":
        monkeypatch.setattr(os, "posix_fallocate", lambda *args: (_ for _ in ()).throw(full))
    else:
        save = np.save
        monkeypatch.setattr(np, "save", lambda file, array: (_ for _ in ()).throw(full)
                            if Path(getattr(file, "name", file)).name.startswith("labels") else save(file, array))
    with pytest.raises(DataError, match="no space left on the device of .*train-cache-16"):
        load_dataset(source, resolution=R)
    assert no_leftovers(tmp_path / "train-cache-16")
    monkeypatch.undo()
    ds, _ = load_quietly(source)                                                 # the rerun just works
    assert (ds.images == expected_colors(ds)).all()


# ----------------------------------------------------------------------------------------------
# Bad paths, and the command lines.

def test_bad_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a folder of class sub-folders nor an npz batch or idx images file"):
        load_dataset(tmp_path / "notes.txt")
    shutil.make_archive(str(tmp_path / "train"), "gztar", root_dir=make_folder(tmp_path / "train"))
    with pytest.raises(DataError, match="is an archive.*extract it"):
        load_dataset(tmp_path / "train.tar.gz")
    (tmp_path / "only-text" / "n01").mkdir(parents=True)
    (tmp_path / "only-text" / "n01" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files under the 1 class folders .*\(skipped 1 files"):
        load_dataset(tmp_path / "only-text")
    (tmp_path / "broken" / "n01").mkdir(parents=True)
    (tmp_path / "broken" / "n01" / "a.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 image files could be decoded"):
        load_dataset(tmp_path / "broken", resolution=R)
    assert not (tmp_path / "broken-cache-16" / "dataset.json").exists()


def test_dataset_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for source in ("missing", "empty"):
        assert dataset.main([str(tmp_path / source)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dataset.py: error: ") and "\n" not in err


@pytest.mark.parametrize("script", ["dataset.py", "train_imagenet.py"])
def test_commands_exit_2_without_traceback(tmp_path, script):
    flags = ["--out", str(tmp_path / "run"), "--data"] if script == "train_imagenet.py" else []
    result = subprocess.run([sys.executable, script, *flags, str(tmp_path / "missing")], cwd=REPO, text=True,
                            capture_output=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "dataset source not found" in result.stderr
    assert not (tmp_path / "run").exists()
