"""The repository's user-fixed ``models/`` folder: the DDF-ResNets live in ``ddf.models`` (registered with timm by
``import ddf``); this re-export keeps ``import models`` working for the scripts."""
from ddf.models import DDF_BLOCK_KWARGS, DDFBasicBlock, DDFBottleneck  # noqa: F401
from ddf.models import ddf_resnet  # noqa: F401

__all__ = ["DDFBasicBlock", "DDFBottleneck", "DDF_BLOCK_KWARGS", "ddf_resnet"]
