"""Test set-up shared by every test module.

* the repository root goes first on sys.path (tests import the checkout, not an installed copy);
* ``demo_root``: the tiny demo data set (10 classes, 8 train / 4 val images each, 32 px), built once per test
  module that asks for it;
* ``train_log``: the messages the ``train`` logger emits at INFO and above during a test;
* on a machine without a CUDA device, Triton's interpreter is switched on before ``ddf`` is imported (``triton.jit``
  reads TRITON_INTERPRET when it decorates), so the Triton kernels run on CPU tensors and are tested against the
  reference like every other backend. Set DDF_TEST_TRITON_INTERPRET=0 to leave TRITON_INTERPRET alone.
"""
import logging
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


if os.environ.get("DDF_TEST_TRITON_INTERPRET", "1") == "1" and not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from training.demo_data import build_demo_dataset

    root = str(tmp_path_factory.mktemp("demo") / "ddf_demo")
    build_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, verbose=False)
    return root


@pytest.fixture
def train_log():
    records = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("train")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)
