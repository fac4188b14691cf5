"""Decoupled Dynamic Filter (DDF) operation and modules."""
from .functional import ddf
from .reference import ddf_reference
from ._backend import backend_info
from .modules import DDFPack, DDFUpPack, FilterNorm
from . import ops as _ops  # noqa: F401  (defines torch.ops.ddf.ddf_forward: compiled kernels or reference)
from . import flops as _flops

__all__ = ["ddf", "ddf_reference", "backend_info", "FilterNorm", "DDFPack", "DDFUpPack"]
__version__ = "0.1.0"

# FLOP formula (3*n*c*k^2) of torch.ops.ddf.ddf_forward for torch.utils.flop_counter.FlopCounterMode.
_flops.register_ddf_flop_formula(strict=False)
