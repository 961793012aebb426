"""What the exporter does around optimum's export (export/tracing.py): optimum's fix of dynamic output axes runs only
where the graph's declared output shapes leave it something to fix."""

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("optimum")

from onnx import TensorProto, helper  # noqa: E402

from edgediff.export.tracing import fix_dynamic_axes  # noqa: E402


class _Config:
    """An OnnxConfig's axes (name -> {index: axis name}), and a record of optimum's fix being asked for."""

    inputs = {"sample": {0: "batch_size", 2: "height", 3: "width"}}
    outputs = {"out_sample": {0: "batch_size", 2: "height", 3: "width"}}

    def __init__(self):
        self.fixed = []

    def fix_dynamic_axes(self, graph):
        self.fixed.append(graph)


def _graph(tmp_path, output_dims):
    """A one-node graph (Identity) whose output declares `output_dims` (None: no shape at all)."""
    sample = helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch_size", 4, "height", "width"])
    out = helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, output_dims)
    if output_dims is None:
        out.type.tensor_type.ClearField("shape")
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["sample"], ["out_sample"])], "g", [sample], [out])
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("dims", "fixed"),
    [
        (["batch_size", 4, "height", "width"], False),  # every axis declared or a number: nothing to fix
        (["batch_size", 4, "Identity_dim_2", "width"], True),  # a name the exporter made up
        (["batch_size", 4, None, "width"], True),  # an axis neither named nor numbered
        (None, True),  # no declared shape: onnxruntime's inference would name the axes
    ],
)
def test_optimums_fix_runs_only_where_an_output_axis_is_undeclared(tmp_path, dims, fixed):
    config, graph = _Config(), _graph(tmp_path, dims)
    assert fix_dynamic_axes(config, graph) is fixed
    assert config.fixed == ([graph] if fixed else [])
