"""Course exercises: `python -m exercises` (see __main__.py and the README)."""
