"""What the exporter does around optimum's export (export/tracing.py): optimum's fix of dynamic output axes runs only
where the graph's declared output shapes leave it something to fix; a tensor's external data is copied file to file
as a read would give it."""

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


@pytest.mark.parametrize("how", ["in the kernel", "a few bytes a call", "refused", "not offered"])
def test_external_data_copies_are_the_bytes_a_read_gives(tmp_path, monkeypatch, how):
    """copy_external appends a tensor's bytes at their offset in its file to the sink, at the sink's position: by
    os.copy_file_range where it runs (in as many calls as it takes), read and written where it is refused or absent;
    past the file's end it copies what is there, as a read does."""
    import os

    from edgediff.export.tracing import copy_external, external_bytes, place_external

    source = bytes(range(256)) * 8
    (tmp_path / "weights.data").write_bytes(source)
    real = getattr(os, "copy_file_range", None)
    if how == "a few bytes a call" and real is not None:
        monkeypatch.setattr(
            os, "copy_file_range", lambda src, dst, count, offset: real(src, dst, min(count, 3), offset)
        )
    elif how == "refused":

        def refused(*args):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refused, raising=False)
    elif how == "not offered":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    tensors = []
    for offset, length in ((100, 700), (0, 5), (2000, 200)):  # the last runs past the end: 48 bytes there
        tensor = TensorProto(name=f"w{offset}")
        place_external(tensor, "weights.data", offset, length)
        tensors.append(tensor)
    with open(tmp_path / "out.data", "wb", buffering=0) as sink:
        sink.write(b"head")
        copied = [copy_external(t, tmp_path, sink) for t in tensors]
        assert sink.tell() == 4 + sum(copied)
    assert copied == [700, 5, 48]
    expected = b"head" + b"".join(external_bytes(t, tmp_path) for t in tensors)
    assert (tmp_path / "out.data").read_bytes() == expected == b"head" + source[100:800] + source[:5] + source[2000:]
