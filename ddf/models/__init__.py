"""DDF-ResNets registered with timm: ``import ddf`` then ``timm.create_model('ddf_mul_resnet50')``.

They ship inside the ``ddf`` package (no top-level ``models`` package is installed, so a user's own ``models/``
folder cannot shadow them); the repository's ``models/`` folder re-exports them for the scripts.
"""
import argparse

import torch

from .ddf_resnet import DDF_BLOCK_KWARGS, DDFBasicBlock, DDFBottleneck  # noqa: F401  (registers the models)

# Training checkpoints written by timm's train.py (the original release's format) store the
# argparse.Namespace of the run under 'args'; allow it for torch.load(weights_only=True).
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])

__all__ = ["DDFBasicBlock", "DDFBottleneck", "DDF_BLOCK_KWARGS"]
