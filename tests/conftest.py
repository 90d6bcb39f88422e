"""Test-session setup, loaded by pytest before any test module imports torch."""
import os

import pytest

# One intra-op thread, here and in the processes the tests spawn: the tests run many small ops, and
# on 2 cores that other jobs share, OpenMP threads waiting for each other made test_unet.py take 85 s
# instead of 7 s. Passive waiting for any threads a test asks for (train_imagenet.py's docstring).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Run folders that test_sample.py and test_evaluate.py only read: teacher (3 steps), guide (2),
    emd (guided EMD student with a lam input, 2) and plain (--guidance none, 1), each trained by
    train_imagenet.main on synthetic 16x16 images with the tiny preset (about 5 s for all four)."""
    import train_imagenet as ti                                     # after the thread settings above
    root = tmp_path_factory.mktemp("runs")
    train = ["--data", "synthetic", "--device", "cpu", "--batch", "8", "--status-kimg", "1", "--snapshot-kimg", "1"]
    ti.main(train + ["--preset", "tiny", "--resolution", "16", "--kimg", "0.024", "--out", str(root / "teacher")])
    ti.main(train + ["--preset", "tiny", "--resolution", "16", "--kimg", "0.016", "--out", str(root / "guide")])
    distill = train + ["--stage", "distill", "--teacher", str(root / "teacher")]
    ti.main(distill + ["--guide", str(root / "guide"), "--kimg", "0.016", "--out", str(root / "emd")])
    ti.main(distill + ["--guidance", "none", "--kimg", "0.008", "--out", str(root / "plain")])
    return root
