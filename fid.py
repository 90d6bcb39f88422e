"""FID and precision/recall of generated images, from Inception-v3 pool features.

    detector  = load_detector("inception-2015-12-05.pt", device)
    feats     = compute_features(detector, images)        # images: uint8 (N, H, W, C), or batches of them
    mu, sigma = feature_stats(feats)
    fid       = frechet_distance(mu, sigma, *load_reference("imagenet-64x64.npz"))

FID is easy to get wrong (docs/method.md §11). Published ImageNet-64 numbers (EDM, EDM2, AYF) use 50k
samples from the EMA weights, the StyleGAN2-ADA TorchScript Inception below, and reference
statistics computed with that same detector (EDM's `fid-refs/imagenet-64x64.npz`). Statistics from
a different Inception port shift the score, so check where a reference file came from; when in
doubt recompute it from the images with `python fid.py --ref-from-npz images.npz ...`.

Nothing here downloads anything: the detector and the reference statistics are files you supply.
"""
import argparse
import os
import sys

import numpy as np
import torch
import tqdm

DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def load_detector(path, device="cpu"):
    """The Inception-v3 feature detector, a TorchScript file: `detector(x, return_features=True)`.

    x is uint8 (N, 3, H, W) in [0, 255] at any resolution (the module resizes to 299 x 299 itself);
    the result is the (N, 2048) pool features. This is the StyleGAN2-ADA port of the TensorFlow
    'inception-2015-12-05' graph that EDM and EDM2 report FID with.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception detector not found at '{path}'. FID needs the TorchScript Inception-v3 of the "
            f"StyleGAN2-ADA metrics, 'inception-2015-12-05.pt', which users normally fetch once by hand "
            f"from {DETECTOR_URL} (this code never downloads it).")
    try:
        return torch.jit.load(path, map_location=device).eval()
    except RuntimeError as error:                                   # not a TorchScript archive (torch's words)
        raise ValueError(f"'{path}' is not a TorchScript file ({str(error).split('.')[0]}); FID needs "
                         f"'inception-2015-12-05.pt' from {DETECTOR_URL}") from None


def check_images(x):
    """Raise a clear error unless x is a uint8 image batch (N, H, W, C), C = 3 (RGB) or 1 (gray)."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images (N, H, W, 3), or (N, H, W, 1) gray, in [0, 255], got dtype {x.dtype} shape "
            f"{tuple(x.shape)}; convert images in [-1, 1] with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8) "
            f"and channels-first ones with x.permute(0, 2, 3, 1)")


@torch.no_grad()
def compute_features(detector, images, batch=250, device="cpu", progress=True):
    """Detector features of uint8 images, float64 (N, D).

    `images` is one uint8 array (N, H, W, C), numpy or torch, or an iterable of such arrays (e.g. a
    generator that samples batches on the fly). Arrays longer than `batch` are split, so the result
    does not depend on how the images were batched. Inception takes RGB: a gray image (C = 1) enters
    with its gray value in all 3 channels, which is how an RGB file shows it.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        chunks, total = [images], len(images)
    else:
        chunks, total = images, None                                    # a generator's length is unknown
    feats = []
    with tqdm.tqdm(total=total, unit="img", desc="inception features", disable=not progress) as bar:
        for chunk in chunks:
            chunk = torch.as_tensor(chunk)
            check_images(chunk)
            for i in range(0, len(chunk), batch):
                x = chunk[i:i + batch].to(device).permute(0, 3, 1, 2)   # (n, C, H, W) uint8
                x = x.expand(-1, 3, -1, -1)                             # (n, 3, H, W), gray copied (C = 1)
                feats.append(detector(x, return_features=True).to(torch.float64).cpu())
                bar.update(len(x))
    if not feats:
        raise ValueError("compute_features got no images")
    return torch.cat(feats).numpy()                                     # (N, D)


def feature_stats(feats):
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (= np.cov(rowvar=False))."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"feature_stats needs features (N, D) with N >= 2, got shape {feats.shape}")
    mu = feats.mean(axis=0)                                             # (D,)
    centered = feats - mu                                               # (N, D)
    sigma = centered.T @ centered / (len(feats) - 1)                    # (D, D)
    return mu, sigma


def check_stats(mu, sigma, name):
    """Return (mu, sigma) as float64 after checking the shapes (D,) and (D, D); `name` goes in errors."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{name}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return mu, sigma


def sqrtm_psd(sigma):
    """Symmetric square root of a positive semi-definite matrix by eigendecomposition.

    Eigenvalues that rounding made slightly negative are clipped to 0.
    """
    lam, V = np.linalg.eigh((sigma + sigma.T) / 2)
    return (V * np.sqrt(lam.clip(min=0))) @ V.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID; Heusel et al. 2017):

        d = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    sigma1 sigma2 is not symmetric, so the trace of its square root comes from symmetric pieces.
    With A = sigma1^{1/2} sigma2^{1/2}, A A^T = sigma1^{1/2} sigma2 sigma1^{1/2} has the eigenvalues
    of sigma1 sigma2 (XY and YX share their eigenvalues), and the singular values of A are their
    square roots, so tr((sigma1 sigma2)^{1/2}) = sum of the singular values of A. Taking singular
    values of A, rather than square roots of eigenvalues of A A^T, keeps near-zero eigenvalues from
    turning rounding noise ~1e-13 into ~3e-7 each; this matters for singular covariances (fewer
    samples than dimensions). Unlike scipy.linalg.sqrtm(sigma1 @ sigma2), nothing here goes complex.
    """
    mu1, sigma1 = check_stats(mu1, sigma1, "frechet_distance, first statistics")
    mu2, sigma2 = check_stats(mu2, sigma2, "frechet_distance, second statistics")
    if len(mu1) != len(mu2):
        raise ValueError(f"frechet_distance: feature dimensions differ, {len(mu1)} vs {len(mu2)}")
    A = sqrtm_psd(sigma1) @ sqrtm_psd(sigma2)                           # (D, D)
    tr_sqrt = np.linalg.svd(A, compute_uv=False).sum()                  # tr((sigma1 sigma2)^{1/2})
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def load_reference(path):
    """Reference statistics (mu, sigma) from an npz with keys 'mu' and 'sigma'.

    That is the format of EDM's fid-refs and of ADM's reference batches (whose other arrays are
    ignored), and what save_reference writes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics not found at '{path}'")
    data = np.load(path)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"'{path}' is not an npz archive; expected one with arrays 'mu' and 'sigma'")
    with data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(
                f"'{path}' lacks {missing} (it holds {data.files}); reference statistics need 'mu' (D,) and "
                f"'sigma' (D, D). Make them from images with `python fid.py --ref-from-npz`.")
        return check_stats(data["mu"], data["sigma"], f"reference '{path}'")


def save_reference(path, mu, sigma):
    """Write (mu, sigma) as an npz that load_reference reads (numpy appends '.npz' if missing)."""
    mu, sigma = check_stats(mu, sigma, "save_reference")
    np.savez(path, mu=mu, sigma=sigma)


def knn_radii(feats, k, batch):
    """Distance from every feature to its k-th nearest neighbour in the same set, (N,).

    The point itself is the nearest (distance 0), hence the (k + 1)-th smallest distance.
    """
    return torch.cat([torch.cdist(feats[i:i + batch], feats).kthvalue(k + 1, dim=1).values  # (b, N) -> (b,)
                      for i in range(0, len(feats), batch)])


def manifold_fraction(queries, feats, radii, batch):
    """Fraction of queries inside the manifold estimate of `feats`: the union of the balls B(phi, radius(phi))."""
    inside = [(torch.cdist(queries[i:i + batch], feats) <= radii).any(dim=1)  # (b, N) -> (b,)
              for i in range(0, len(queries), batch)]
    return torch.cat(inside).double().mean().item()


@torch.no_grad()
def precision_recall(real_feats, fake_feats, k=3, batch=1024, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) from features (N, D), numpy or torch.

    Each set's manifold is estimated as the union of balls around its points, each ball reaching
    to that point's k-th nearest neighbour in its own set. Precision is the fraction of fakes inside
    the real manifold (are samples realistic?); recall the fraction of reals inside the fake manifold
    (is the data covered?). Distances are computed in float32, `batch` rows at a time, so memory
    grows like batch * N rather than N^2.
    """
    real = torch.as_tensor(real_feats, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake_feats, dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs features (N, D) with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall with k = {k} needs more than {k} features per set, got {len(real)} and {len(fake)}")
    precision = manifold_fraction(fake, real, knn_radii(real, k, batch), batch)
    recall = manifold_fraction(real, fake, knn_radii(fake, k, batch), batch)
    return precision, recall


def main(argv=None):
    """Reference statistics from an npz of uint8 images (N, H, W, 3) stored under 'arr_0'."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ref-from-npz", required=True, help="npz with uint8 images (N, H, W, 3) under 'arr_0'")
    parser.add_argument("--detector",     required=True, help="path to inception-2015-12-05.pt")
    parser.add_argument("--out",          required=True, help="where to write the npz with 'mu' and 'sigma'")
    parser.add_argument("--batch",        type=int, default=250, help="images per detector call")
    parser.add_argument("--device",       default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    detector = load_detector(args.detector, args.device)
    if not os.path.isfile(args.ref_from_npz):
        raise FileNotFoundError(f"--ref-from-npz '{args.ref_from_npz}' does not exist")
    with np.load(args.ref_from_npz) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"'{args.ref_from_npz}' holds {data.files}, not the images under 'arr_0' "
                             f"(np.savez(path, images) writes them there)")
        images = data["arr_0"]                                          # (N, H, W, 3) uint8
    mu, sigma = feature_stats(compute_features(detector, images, args.batch, args.device))
    save_reference(args.out, mu, sigma)
    print(f"{len(images)} images -> {args.out} (mu {mu.shape}, sigma {sigma.shape})")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:                # a missing or wrong file: one line, exit 2
        print(f"fid.py: error: {error}", file=sys.stderr)
        sys.exit(2)
