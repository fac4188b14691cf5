"""Phases of ``tools/gpu_acceptance.py``: one module per phase, each with ``run(ctx) -> dict``.

A phase runs in its own process (``tools/gpu_acceptance.py --phase NAME``) so that a hang or crash in one leaves
the others' results; it returns ``{"status": "pass"|"fail"|"skipped", "detail"/"reason": str, "tables": [...]}``.
"""
PHASES = ("env", "correctness", "speed", "training", "sanitizer")
#: phases whose failure makes the acceptance command exit non-zero (speed only reports)
GATING = ("correctness", "training", "sanitizer")
