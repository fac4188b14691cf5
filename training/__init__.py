"""Training engine behind train.py / validate.py / test_time.py.

Modules (one concern each):

* ``io``         the one atomic file writer, output-path checks
* ``checkpoint`` verified checkpoint files (sha256 inside the zip), loading, the last/best/top-k saver and its index
* ``data``       dataset readers (our checked image folder, timm's tar / Hugging Face readers), bad-image policy,
                 the resumable distributed sampler, dataset fingerprints
* ``runtime``    device / distributed set-up, AMP, RNG state, stop signals, logging, the per-epoch run log
* ``engine``     ``train_one_epoch`` and ``evaluate``
* ``step_stats`` on-device loss statistics of the steps (read at the sync points) and the non-finite-step rule
* ``cli``        argument parsing helpers: YAML configs with type checks, option value checks, the CLI wrapper
* ``demo_data``  the procedurally drawn demo dataset
"""
