"""Decoupled Dynamic Filter (DDF) operation and modules."""
from .functional import ddf
from .reference import ddf_reference
from ._backend import backend_info
from .modules import DDFPack, DDFUpPack, FilterNorm
from . import flops as _flops

__all__ = ["ddf", "ddf_reference", "backend_info", "FilterNorm", "DDFPack", "DDFUpPack"]
__version__ = "0.1.0"

# FLOP formula of torch.ops.ddf.ddf_forward for torch.utils.flop_counter (no-op while the op is missing;
# tables.py registers it strictly). Keep this last so that an op defined above is seen.
_flops.register_ddf_flop_formula(strict=False)
