"""The training side: engine helpers (common.py), checkpoints (checkpoint.py), data readers, folder checks and the
resumable sampler (data.py), and the embedded demo dataset (demo_data.py). Used by train.py, validate.py and
test_time.py; not part of the installed ddf package."""
