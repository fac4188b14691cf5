"""Decoupled Dynamic Filter (DDF) operation and modules."""
from .functional import ddf
from .reference import ddf_reference
from ._backend import backend_info
from .modules import DDFPack, DDFUpPack, FilterNorm

__all__ = ["ddf", "ddf_reference", "backend_info", "FilterNorm", "DDFPack", "DDFUpPack"]
__version__ = "0.1.0"
