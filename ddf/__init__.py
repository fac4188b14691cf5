"""Decoupled Dynamic Filter (DDF) operation and modules."""
from .functional import ddf
from .reference import ddf_reference
from .modules import DDFPack, DDFUpPack, FilterNorm

__all__ = ["ddf", "ddf_reference", "FilterNorm", "DDFPack", "DDFUpPack"]
__version__ = "0.1.0"
