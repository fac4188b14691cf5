"""Deployment: torch.export of every DDF model (the op stays one node), ONNX export through ddf.export_onnx with
standard operators only, run in onnxruntime and compared with PyTorch."""
import pytest
import timm
import torch

import ddf
from ddf.export import export_onnx

DDF_MODELS = timm.list_models("ddf_*")


def test_every_ddf_model_is_registered():
    assert len(DDF_MODELS) == 12 and "ddf_mul_resnet50" in DDF_MODELS


@pytest.mark.parametrize("name", DDF_MODELS)
def test_torch_export_keeps_the_op(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,))
    ops = [n for n in program.graph.nodes if n.op == "call_function" and "ddf_forward" in str(n.target)]
    assert ops and all(n.target == torch.ops.ddf.ddf_forward.default for n in ops)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,size", [("ddf_mul_resnet_tiny", 32), ("ddf_add_resnet_tiny", 32),
                                       ("ddf_mul_resnet50", 96)])
def test_onnx_export_runs_in_onnxruntime(name, size, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the test extra installs onnx")
    ort = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, size, size)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, (x,), str(path))
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, "only standard ONNX operators"
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert abs(got - ref).max() <= 1e-4 * max(1.0, abs(ref).max())


def test_export_onnx_bad_arguments(tmp_path):
    model = timm.create_model("ddf_mul_resnet_tiny")
    with pytest.raises(TypeError, match="example_inputs must be a tuple of tensors"):
        export_onnx(model, torch.randn(1, 3, 32, 32), str(tmp_path / "m.onnx"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, (torch.randn(1, 3, 32, 32),), str(tmp_path / "missing" / "m.onnx"))
