"""Test-session setup, loaded by pytest before any test module imports torch."""
import os

# One intra-op thread, here and in the processes the tests spawn: the tests run many small ops, and
# on 2 cores that other jobs share, OpenMP threads waiting for each other made test_unet.py take 85 s
# instead of 7 s. Passive waiting for any threads a test asks for (train_imagenet.py's docstring).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
