"""Decoupled Dynamic Filter (DDF) operation and modules."""
from . import flops as _flops
from .backends import backend_info, use_backend
from .functional import ddf
from .modules import DDFPack, DDFUpPack, FilterNorm
from .reference import ddf_reference
from .export import export_onnx
from .convert import ConvertReport, convert
from . import models  # noqa: F401,E402  (registers the DDF-ResNets with timm)

__all__ = ["ddf", "ddf_reference", "backend_info", "use_backend", "export_onnx", "FilterNorm", "DDFPack", "DDFUpPack",
           "convert", "ConvertReport"]
__version__ = "0.2.0"

# FLOP formula (3*n*c*k^2) of torch.ops.ddf.ddf_forward for torch.utils.flop_counter.FlopCounterMode.
_flops.register_ddf_flop_formula(strict=True)
