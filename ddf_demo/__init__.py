"""Helpers for train.py / validate.py: the embedded demo dataset, folder checks, checkpoints."""
