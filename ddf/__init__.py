"""Decoupled Dynamic Filter (DDF) operation and modules."""
from .functional import ddf
from .reference import ddf_reference

__all__ = ["ddf", "ddf_reference"]
__version__ = "0.1.0"
