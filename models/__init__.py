"""DDF-ResNets registered with timm: ``import models`` then ``timm.create_model('ddf_mul_resnet50')``."""
import argparse

import torch

from .ddf_resnet import DDFBasicBlock, DDFBottleneck  # noqa: F401  (registers the models)

# Training checkpoints written by timm's train.py (the original release's format) store the
# argparse.Namespace of the run under 'args'; allow it for torch.load(weights_only=True).
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])

__all__ = ["DDFBasicBlock", "DDFBottleneck"]
