"""Deployment: ``torch.export`` keeps the DDF op as one node (its fake kernel gives shapes); :func:`export_onnx`
writes an ONNX model of standard ONNX operators only, the op decomposed through the PyTorch reference
(unfold, multiply, sum) at export time, so any ONNX runtime can run it."""
from __future__ import annotations

import os
from typing import Any, Dict, Sequence

import torch

from .reference import ddf_reference

__all__ = ["decomposition_table", "export_onnx"]


def _ddf_forward_decomposition(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
                               spatial_norm=False, spatial_gain=1.0):
    return ddf_reference(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
                         spatial_norm, spatial_gain)


def decomposition_table() -> Dict[Any, Any]:
    """torch.export's default decompositions plus ``ddf::ddf_forward`` -> the reference implementation."""
    table = torch.export.default_decompositions()
    table[torch.ops.ddf.ddf_forward.default] = _ddf_forward_decomposition
    return table


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str, **kwargs):
    """Export ``model`` (in eval mode) to an ONNX file at ``path`` made of standard ONNX operators.

    ``example_inputs`` is a tuple of tensors (shapes are fixed to theirs unless ``dynamic_shapes=`` is passed
    through ``kwargs`` to :func:`torch.export.export`). Returns the :class:`torch.onnx.ONNXProgram`. Needs the
    ``onnx`` and ``onnxscript`` packages (``pip install "ddf[export]"``).
    """
    if not isinstance(example_inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("export_onnx: example_inputs must be a tuple of tensors, e.g. (torch.randn(1, 3, 224, 224),)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"export_onnx: the folder of path {path!r} does not exist")
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install \"ddf[export]\"") from exc
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, tuple(example_inputs), **kwargs)
        program = program.run_decompositions(decomposition_table())
        onnx_program = torch.onnx.export(program, tuple(example_inputs), dynamo=True, verbose=False)
    finally:
        model.train(was_training)
    onnx_program.save(path)
    return onnx_program
