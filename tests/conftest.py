"""Test-session setup, loaded by pytest before any test module imports torch."""
import os

# On shared CPU cores, spinning OpenMP threads make torch many times slower (train_imagenet.py's
# docstring has the measurements); passive waiting costs nothing when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
