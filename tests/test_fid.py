"""fid.py against independent computations: closed forms, a Denman-Beavers matrix square root,
numpy block means for the detector path, and brute-force k-NN for precision/recall.

Offline and CPU-only: a tiny TorchScript module with the Inception detector's call signature
stands in for inception-2015-12-05.pt and goes through load_detector like the real file.
"""
import numpy as np
import pytest
import torch

import fid

# The real detector is a TorchScript file, so the stand-in must be one too; torch deprecates the API.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class BlockMeans(torch.nn.Module):
    """Stand-in detector: features = per-channel means over a 4 x 4 grid of blocks, (N, 48)."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3, "expects uint8 (N, 3, H, W)"
        f = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)    # (N, 3 * 4 * 4)
        return f if return_features else f.mean(dim=1, keepdim=True)


@pytest.fixture
def detector(tmp_path):
    path = str(tmp_path / "detector.pt")
    torch.jit.save(torch.jit.script(BlockMeans()), path)
    return fid.load_detector(path, "cpu")


def random_spd(rng, d, low=0.5, high=3.0):
    """A random symmetric positive definite (d, d) matrix with eigenvalues in [low, high]."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * rng.uniform(low, high, d)) @ Q.T


def sqrtm_denman_beavers(A, iters=60):
    """Principal square root of A by the Denman-Beavers iteration: Y -> A^{1/2}, Z -> A^{-1/2}."""
    Y, Z = A.copy(), np.eye(len(A))
    for _ in range(iters):
        Y, Z = (Y + np.linalg.inv(Z)) / 2, (Z + np.linalg.inv(Y)) / 2
    return Y


# Frechet distance.

def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in [(500, 8), (20, 64)]:                                  # full-rank and singular covariance
        mu, sigma = fid.feature_stats(rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, d))
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_of_a_mean_shift_is_its_squared_length():
    rng = np.random.default_rng(1)
    mu, sigma = fid.feature_stats(rng.standard_normal((300, 10)))
    u = rng.standard_normal(10)
    dists = [fid.frechet_distance(mu + a * u, sigma, mu, sigma) for a in np.linspace(0, 3, 7)]
    np.testing.assert_allclose(dists, np.linspace(0, 3, 7) ** 2 * (u @ u), rtol=1e-9, atol=1e-9)
    assert np.all(np.diff(dists) > 0)


def test_frechet_distance_diagonal_closed_form():
    """Commuting covariances: d = ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 4.0, 6), rng.uniform(0.1, 4.0, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_denman_beavers_square_root():
    """General SPD covariances: the trace term against an iteration that uses no eigendecomposition."""
    rng = np.random.default_rng(3)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = random_spd(rng, d), random_spd(rng, d)
    root = sqrtm_denman_beavers(sigma1 @ sigma2)
    np.testing.assert_allclose(root @ root, sigma1 @ sigma2, rtol=1e-10, atol=1e-10)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-10)


def test_feature_stats_matches_np_cov():
    feats = np.random.default_rng(4).standard_normal((50, 7))
    mu, sigma = fid.feature_stats(feats)
    np.testing.assert_allclose(mu, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-12, atol=1e-14)


# Detector and features.

def test_compute_features_matches_numpy_and_ignores_batching(detector):
    images = np.random.default_rng(5).integers(0, 256, (37, 16, 16, 3), dtype=np.uint8)
    blocks = images.reshape(37, 4, 4, 4, 4, 3).astype(np.float64).mean(axis=(2, 4))   # (N, 4, 4, 3)
    expected = blocks.transpose(0, 3, 1, 2).reshape(37, 48)                            # channel-major, like NCHW
    for batch in [1, 10, 250]:
        feats = fid.compute_features(detector, images, batch=batch, progress=False)
        assert feats.dtype == np.float64 and feats.shape == (37, 48)
        np.testing.assert_allclose(feats, expected, rtol=1e-6)
    chunks = (images[i:j] for i, j in [(0, 5), (5, 30), (30, 37)])                   # an iterable of batches
    np.testing.assert_allclose(fid.compute_features(detector, chunks, batch=8, progress=False), expected, rtol=1e-6)
    np.testing.assert_allclose(fid.compute_features(detector, torch.from_numpy(images), progress=False), expected, rtol=1e-6)


def test_gray_images_enter_inception_as_rgb_with_equal_channels(detector):
    """A 1-channel image's features are those of the RGB image with its gray value in every channel;
    the BlockMeans stand-in asserts it receives 3 channels."""
    gray = np.random.default_rng(7).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    expected = fid.compute_features(detector, np.repeat(gray, 3, axis=-1), progress=False)
    np.testing.assert_array_equal(fid.compute_features(detector, gray, progress=False), expected)
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\) gray"):
        fid.compute_features(detector, np.zeros((4, 16, 16, 2), np.uint8), progress=False)


def test_compute_features_rejects_float_images(detector):
    with pytest.raises(ValueError, match="uint8"):
        fid.compute_features(detector, np.zeros((4, 16, 16, 3), np.float32), progress=False)


def test_load_detector_missing_file(tmp_path):
    path = str(tmp_path / "nowhere" / "inception-2015-12-05.pt")
    with pytest.raises(FileNotFoundError, match="StyleGAN2-ADA") as err:
        fid.load_detector(path, "cpu")
    assert path in str(err.value)


# Reference statistics.

def test_reference_round_trip_and_errors(tmp_path):
    mu, sigma = fid.feature_stats(np.random.default_rng(6).standard_normal((30, 5)))
    path = str(tmp_path / "ref.npz")
    fid.save_reference(path, mu, sigma)
    mu2, sigma2 = fid.load_reference(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    np.savez(tmp_path / "no_sigma.npz", mu=mu)
    with pytest.raises(ValueError, match="sigma"):
        fid.load_reference(str(tmp_path / "no_sigma.npz"))
    np.savez(tmp_path / "bad_shape.npz", mu=mu, sigma=sigma[:4])
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        fid.load_reference(str(tmp_path / "bad_shape.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_reference(str(tmp_path / "missing.npz"))


def test_cli_reference_from_images(detector, tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images)
    torch.jit.save(torch.jit.script(BlockMeans()), str(tmp_path / "det.pt"))
    fid.main(["--ref-from-npz", str(tmp_path / "images.npz"), "--detector", str(tmp_path / "det.pt"),
              "--out", str(tmp_path / "ref.npz"), "--batch", "6", "--device", "cpu"])
    mu, sigma = fid.load_reference(str(tmp_path / "ref.npz"))
    mu_direct, sigma_direct = fid.feature_stats(fid.compute_features(detector, images, progress=False))
    np.testing.assert_allclose(mu, mu_direct, rtol=1e-9)
    np.testing.assert_allclose(sigma, sigma_direct, rtol=1e-9, atol=1e-9)


# Precision and recall.

def precision_recall_bruteforce(real, fake, k):
    """Kynkaanniemi et al. 2019 with full float64 distance matrices and sorting."""
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))          # (len(a), len(b))
    r_real = np.sort(dist(real, real), axis=1)[:, k]                   # column 0 is the point itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= r_real).any(axis=1).mean()
    recall = (dist(real, fake) <= r_fake).any(axis=1).mean()
    return precision, recall


def mixture(rng, n, modes, std=0.5, radius=10.0, n_modes=8):
    """n points from equal-weight Gaussians centred on `modes`, out of n_modes equally spaced on a circle."""
    angles = 2 * np.pi * rng.choice(modes, n) / n_modes
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1) + std * rng.standard_normal((n, 2))


def test_precision_recall_matches_bruteforce():
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((150, 6)), 0.8 * rng.standard_normal((120, 6)) + 0.3
    expected = precision_recall_bruteforce(real, fake, k=3)
    for batch in [7, 1024]:
        assert fid.precision_recall(real, fake, k=3, batch=batch) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_limits():
    rng = np.random.default_rng(9)
    real = mixture(rng, 2000, modes=range(8))
    assert fid.precision_recall(real, real) == (1.0, 1.0)

    half = mixture(rng, 1000, modes=range(4))                           # drops half of the modes
    precision, recall = fid.precision_recall(real, half)
    assert precision > 0.95 and abs(recall - 0.5) < 0.05

    far = real + 1000.0
    assert fid.precision_recall(real, far) == (0.0, 0.0)


def test_command_line_mistakes_are_one_line_and_exit_code_2(tmp_path):
    """`python fid.py --ref-from-npz`: a detector that is not TorchScript, missing images, or an npz without
    'arr_0' each end in one line naming the file, exit code 2, no traceback; a good call writes mu, sigma."""
    import subprocess
    import sys
    good = str(tmp_path / "detector.pt")
    torch.jit.save(torch.jit.script(BlockMeans()), good)
    (tmp_path / "garbage.pt").write_text("not a TorchScript archive")
    np.savez(tmp_path / "images.npz", np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "other.npz", pictures=np.zeros((4, 8, 8, 3), np.uint8))

    def run(detector, images):
        argv = ["--detector", str(tmp_path / detector), "--ref-from-npz", str(tmp_path / images),
                "--out", str(tmp_path / "ref.npz"), "--device", "cpu"]
        return subprocess.run([sys.executable, fid.__file__, *argv], capture_output=True, text=True)

    for detector, images, expected in (("garbage.pt", "images.npz", "not a TorchScript file"),
                                       ("detector.pt", "missing.npz", "does not exist"),
                                       ("detector.pt", "other.npz", "not the images under 'arr_0'")):
        result = run(detector, images)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and expected in result.stderr
    assert run("detector.pt", "images.npz").returncode == 0
    assert fid.load_reference(str(tmp_path / "ref.npz"))[0].shape == (48,)
