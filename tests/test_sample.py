"""sample.py on a CPU, on real tiny snapshots: a teacher, a weak guide and two students, each trained
for a few steps on synthetic 16x16 images by train_imagenet.main (about 5 s for all four).

Each test compares two independent computations: one big batch against small batches and single
images, two processes against one, the CLI's files against the sampler called directly, counted
network calls against the reported NFE, FID against --ref statistics against FID against the same
images given as --ref-data.
"""
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import fid
import sample
from checkpoint import UsageError
import train_imagenet as ti
from flowmap import as_velocity

R, K = 16, 10                                                           # resolution and classes of the runs


@pytest.fixture
def detector_file(tmp_path):
    """A TorchScript stand-in for inception-2015-12-05.pt (as in test_fid.py): 4 x 4 block means, (N, 48)."""
    class BlockMeans(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            f = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)     # (N, 3 * 4 * 4)
            return f if return_features else f.mean(dim=1, keepdim=True)

    path = tmp_path / "detector.pt"
    torch.jit.save(torch.jit.script(BlockMeans()), str(path))
    return str(path)


def load_npz(path):
    with np.load(path) as data:
        return data["arr_0"], data["labels"]


def assert_images_close(a, b):
    """uint8 images from float computations that agree to ~1e-6: a pixel may round either way."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


# ----------------------------------------------------------------------------------------------
# Each image depends only on its seed.

@pytest.mark.parametrize("ckpt, gamma, lam", [("emd", 0.0, 1.5), ("emd", 0.5, 2.0), ("teacher", None, 1.0)])
def test_images_depend_only_on_their_seed(runs, ckpt, gamma, lam):
    """Seeds 0-7 in one batch of 8, in batches of 3, and seed 5 alone: the same images and labels.

    gamma 0.5 re-noises after every jump, so this also checks the per-seed re-noising draws.
    """
    net, config = ti.load_snapshot(runs / ckpt)
    if gamma is None:
        sampler, _ = sample.ode_sampler(net, 3, "heun")
    else:
        sampler, _ = sample.flow_map_sampler(net, 3, gamma, lam)
    seeds = list(range(8))
    x8, labels8 = sample.sample_seeds(sampler, seeds, range(8), None, config, "cpu")          # (8, 3, R, R)
    chunks = [sample.sample_seeds(sampler, seeds, range(i, min(i + 3, 8)), None, config, "cpu") for i in (0, 3, 6)]
    x3, labels3 = torch.cat([x for x, _ in chunks]), torch.cat([label for _, label in chunks])
    x1, labels1 = sample.sample_seeds(sampler, [5], [0], None, config, "cpu")                 # seed 5 alone

    torch.testing.assert_close(x3, x8, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1[0], x8[5], rtol=1e-6, atol=1e-6)
    assert labels3.tolist() == labels8.tolist() and labels1.item() == labels8[5].item()
    assert len(set(labels8.tolist())) > 1                               # random classes, not all the same
    assert x8.std(dim=(1, 2, 3)).min() > 0.1                            # images, not a constant


def test_renoising_uses_each_seeds_own_noise(runs):
    """gamma-sampling draws fresh noise: gamma 0.5 differs from gamma 0, and two runs agree exactly."""
    net, config = ti.load_snapshot(runs / "emd")
    seeds = [3, 4]
    x0, _ = sample.sample_seeds(sample.flow_map_sampler(net, 2, 0.0, 1.0)[0], seeds, [0, 1], None, config, "cpu")
    xa, _ = sample.sample_seeds(sample.flow_map_sampler(net, 2, 0.5, 1.0)[0], seeds, [0, 1], None, config, "cpu")
    xb, _ = sample.sample_seeds(sample.flow_map_sampler(net, 2, 0.5, 1.0)[0], seeds, [0, 1], None, config, "cpu")
    assert torch.equal(xa, xb)
    assert (xa - x0).abs().max() > 1e-3


def test_two_processes_match_one(runs, tmp_path):
    """--gpus 2 on the CPU (gloo): seeds strided over the ranks and gathered back in seed order."""
    argv = ["--ckpt", str(runs / "emd"), "--steps", "2", "--seeds", "0-8", "--device", "cpu", "--batch", "3"]
    sample.main(argv + ["--out", str(tmp_path / "one.npz")])
    sample.main(argv + ["--out", str(tmp_path / "two.npz"), "--gpus", "2"])
    images1, labels1 = load_npz(tmp_path / "one.npz")
    images2, labels2 = load_npz(tmp_path / "two.npz")
    assert_images_close(images2, images1)
    assert labels2.tolist() == labels1.tolist()


# ----------------------------------------------------------------------------------------------
# Output files.

def test_npz_grid_and_outdir(runs, tmp_path):
    """The files hold what the sampler computes directly, in the layout the FID tools read."""
    sample.main(["--ckpt", str(runs / "emd"), "--steps", "2", "--seeds", "4-13", "--classes", "1,5",
                 "--guidance", "1.5", "--grid", str(tmp_path / "grid.png"), "--outdir", str(tmp_path / "png"),
                 "--out", str(tmp_path / "s.npz"), "--batch", "4"])
    images, labels = load_npz(tmp_path / "s.npz")
    assert images.shape == (10, R, R, 3) and images.dtype == np.uint8   # NHWC
    assert labels.tolist() == [1, 5] * 5                                # --classes cycled over the seeds

    net, config = ti.load_snapshot(runs / "emd")
    sampler, _ = sample.flow_map_sampler(net, 2, 0.0, 1.5)
    x, direct_labels = sample.sample_seeds(sampler, list(range(4, 14)), range(10), [1, 5], config, "cpu")
    expected = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert_images_close(images, expected)
    assert direct_labels.tolist() == labels.tolist()

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * R, 4 * R, 3)                              # 10 images: 4 columns, 3 rows
    np.testing.assert_array_equal(grid[R:2 * R, :R], images[4])        # row-major: image 4 starts row 1
    assert not grid[2 * R:, 2 * R:].any()                               # the two empty cells are black

    files = sorted(os.listdir(tmp_path / "png"))
    assert files == [f"seed{seed:06d}.png" for seed in range(4, 14)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "seed000007.png")), images[3])


def test_several_step_counts_get_suffixes(runs, tmp_path):
    sample.main(["--ckpt", str(runs / "emd"), "--steps", "1,3", "--seeds", "0-4", "--out", str(tmp_path / "s.npz"),
                 "--grid", str(tmp_path / "g.png")])
    assert sorted(os.listdir(tmp_path)) == ["g-1steps.png", "g-3steps.png", "s-1steps.npz", "s-3steps.npz"]
    one, _ = load_npz(tmp_path / "s-1steps.npz")
    three, _ = load_npz(tmp_path / "s-3steps.npz")
    assert one.shape == three.shape == (5, R, R, 3) and not np.array_equal(one, three)


# ----------------------------------------------------------------------------------------------
# The teacher's ODE.

def count_calls(net):
    """Wrap net so that every forward adds 1 to the returned list's first entry."""
    calls = [0]
    net.register_forward_hook(lambda module, inputs, output: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("solver, steps, nfe", [("euler", 4, 4), ("heun", 4, 7)])
def test_teacher_ode_nfe_and_autoguidance(runs, solver, steps, nfe):
    """The reported NFE is the number of network calls; lam = 1 with a guide is the unguided ODE;
    lam = 2 calls the guide as often as the teacher and changes the images."""
    net, config = ti.load_snapshot(runs / "teacher")
    guide, _ = ti.load_snapshot(runs / "guide")
    calls, guide_calls = count_calls(net), count_calls(guide)
    weak = as_velocity(guide)
    seeds = [0, 1, 2]

    plain, reported = sample.ode_sampler(net, steps, solver)
    x, _ = sample.sample_seeds(plain, seeds, range(3), None, config, "cpu")
    assert reported == nfe and calls[0] == nfe

    lam1, _ = sample.ode_sampler(net, steps, solver, weak, lam=1.0)
    x1, _ = sample.sample_seeds(lam1, seeds, range(3), None, config, "cpu")
    assert torch.equal(x1, x) and guide_calls[0] == 0

    lam2, _ = sample.ode_sampler(net, steps, solver, weak, lam=2.0)
    x2, _ = sample.sample_seeds(lam2, seeds, range(3), None, config, "cpu")
    assert guide_calls[0] == nfe and (x2 - x).abs().max() > 1e-3


def test_teacher_cli_autoguidance_and_cfg(runs, tmp_path):
    base = ["--ckpt", str(runs / "teacher"), "--steps", "3", "--seeds", "0-3"]
    sample.main(base + ["--out", str(tmp_path / "plain.npz")])
    sample.main(base + ["--out", str(tmp_path / "guide1.npz"), "--guide", str(runs / "guide")])
    sample.main(base + ["--out", str(tmp_path / "guide2.npz"), "--guide", str(runs / "guide"), "--guidance", "2"])
    sample.main(base + ["--out", str(tmp_path / "cfg2.npz"), "--cfg", "--guidance", "2", "--solver", "euler"])
    plain, guide1, guide2, cfg2 = (load_npz(tmp_path / f"{name}.npz")[0]
                                   for name in ("plain", "guide1", "guide2", "cfg2"))
    np.testing.assert_array_equal(guide1, plain)
    assert not np.array_equal(guide2, plain) and not np.array_equal(cfg2, plain)


# ----------------------------------------------------------------------------------------------
# FID and speed.

def test_fid_end_to_end(runs, tmp_path, detector_file, capsys):
    """FID against --ref-data synthetic, and against --ref statistics of the same 512 images: equal."""
    images = dataset.load_dataset("synthetic", resolution=R).images                   # (512, R, R, 3)
    detector = fid.load_detector(detector_file)
    fid.save_reference(str(tmp_path / "ref.npz"), *fid.feature_stats(fid.compute_features(detector, images)))
    base = ["--ckpt", str(runs / "emd"), "--steps", "1,2", "--fid", "--detector", detector_file,
            "--num", "512", "--batch", "128"]

    capsys.readouterr()
    sample.main(base + ["--ref-data", "synthetic"])
    from_data = capsys.readouterr().out
    sample.main(base + ["--ref", str(tmp_path / "ref.npz")])
    from_ref = capsys.readouterr().out

    fids = {}
    for name, out in [("data", from_data), ("ref", from_ref)]:
        lines = [line for line in out.splitlines() if "FID" in line]
        assert [int(re.search(r"steps (\d+)", line).group(1)) for line in lines] == [1, 2]
        fids[name] = [float(re.search(r"FID (\S+)", line).group(1)) for line in lines]
        assert all(math.isfinite(d) and d > 0 for d in fids[name])
    assert fids["data"] == pytest.approx(fids["ref"], rel=1e-6)
    assert all("precision" in line and "recall" in line for line in from_data.splitlines() if "FID" in line)


def test_bench_table(runs, capsys):
    sample.main(["--ckpt", str(runs / "emd"), "--steps", "1,2", "--bench", "--teacher", str(runs / "teacher"),
                 "--teacher-steps", "2", "--batch", "2", "--reps", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["flow", "map", "1", "1"] == rows[1][:4] and ["teacher", "heun", "2", "3"] == rows[3][:4]
    assert rows[3][-1] == "1.0x"


# ----------------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("flags, error, match", [
    (["--ckpt", "{runs}/missing", "--grid", "g.png"],                  ValueError,        "no snapshot"),
    (["--ckpt", "{runs}/emd", "--fid", "--ref-data", "synthetic"],     ValueError, "--fid needs --detector"),
    (["--ckpt", "{runs}/emd", "--fid", "--detector", "{runs}/x.pt"],  ValueError, "exactly one reference"),
    (["--ckpt", "{runs}/emd", "--guide", "{runs}/guide", "--grid", "g.png"], ValueError, "--guide and --cfg"),
    (["--ckpt", "{runs}/emd", "--solver", "euler", "--grid", "g.png"], ValueError, "--solver"),
    (["--ckpt", "{runs}/plain", "--guidance", "2", "--grid", "g.png"], ValueError, "no lam input"),
    (["--ckpt", "{runs}/teacher", "--gamma", "0.5", "--grid", "g.png"], ValueError, "--gamma"),
    (["--ckpt", "{runs}/teacher", "--guidance", "2", "--grid", "g.png"], ValueError, "needs a weak model"),
    (["--ckpt", "{runs}/teacher", "--bench", "--teacher", "{runs}/teacher"], ValueError, "compare a flow map"),
    (["--ckpt", "{runs}/emd"],                                         ValueError, "nothing to do"),
])
def test_clear_errors(runs, flags, error, match):
    with pytest.raises(error, match=re.escape(match)):
        sample.main([flag.format(runs=runs) for flag in flags])


def test_a_detector_that_is_not_torchscript_is_a_usage_error_before_sampling(runs, tmp_path):
    garbage = tmp_path / "inception.pt"
    garbage.write_text("not a TorchScript archive")
    with pytest.raises(UsageError, match="not a TorchScript file"):
        sample.main(["--ckpt", str(runs / "emd"), "--fid", "--detector", str(garbage), "--ref-data", "synthetic"])


# ----------------------------------------------------------------------------------------------
# Gray idx data: one channel end to end.

def write_idx(path, array):
    """An idx file from the format's definition: 0x0000, type 0x08 (uint8), ndim, big-endian sizes, data."""
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes() + array.tobytes())


def test_gray_idx_data_trains_and_samples_one_channel(runs, tmp_path):
    """A teacher and a student trained on 12x12 gray idx images (padded to 16) take and sample 1 channel;
    the PNGs are 8-bit grayscale holding the npz's pixels; RGB teachers and guides are refused for them."""
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (16, 12, 12), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", (np.arange(16) % K).astype(np.uint8))
    train = ["--data", str(tmp_path / "t10k-images-idx3-ubyte"), "--cache-dir", str(tmp_path / "cache"),
             "--device", "cpu", "--batch", "8", "--status-kimg", "1", "--snapshot-kimg", "1"]
    teacher, student = str(tmp_path / "teacher"), str(tmp_path / "student")
    ti.main(train + ["--preset", "tiny", "--resolution", str(R), "--kimg", "0.016", "--out", teacher])
    ti.main(train + ["--stage", "distill", "--teacher", teacher, "--guidance", "none", "--kimg", "0.008", "--out", student])
    net, config = ti.load_snapshot(student)
    assert config["img_channels"] == 1 and net.conv_in.weight.shape[1] == 1 + 1      # gray + UNet's constant input

    sample.main(["--ckpt", student, "--steps", "1", "--seeds", "0-3", "--grid", str(tmp_path / "grid.png"),
                 "--outdir", str(tmp_path / "png"), "--out", str(tmp_path / "s.npz")])
    images, _ = load_npz(tmp_path / "s.npz")
    assert images.shape == (4, R, R, 1)
    png, grid = Image.open(tmp_path / "png" / "seed000002.png"), Image.open(tmp_path / "grid.png")
    assert png.mode == grid.mode == "L" and grid.size == (2 * R, 2 * R)
    np.testing.assert_array_equal(np.asarray(png), images[2, ..., 0])
    np.testing.assert_array_equal(np.asarray(grid)[R:, :R], images[2, ..., 0])         # row-major, 2 columns

    with pytest.raises(ValueError, match="trained on 3-channel images, --data .* has 1 channels"):
        ti.main(train + ["--stage", "distill", "--teacher", str(runs / "teacher"), "--guidance", "none",
                         "--out", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="--guide .* has 3 image channels, but --ckpt has 1"):
        sample.main(["--ckpt", teacher, "--guide", str(runs / "guide"), "--guidance", "2", "--seeds", "0"])
