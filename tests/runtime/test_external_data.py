"""A bundle's external-data paths read off its graphs (runtime/external_data.py) before OpenVINO, which follows them
anywhere, is given one: every place an ONNX graph can name a file, and each way a path can leave the bundle."""

import os

import pytest
from tiny_models import tiny_bundle

from edgediff.runtime import BundleError, Pipeline
from edgediff.runtime.external_data import check_external_data, external_locations


def _graph_with_external_data(path, locations, nested=None, constant=None):
    """A graph whose initializers (and, optionally, a subgraph's initializer and a Constant's tensor) name these
    external-data files; the files themselves are never written: only the names are read."""
    import onnx
    from onnx import TensorProto, helper

    def tensor(name, location):
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], [1.0])
        if location is not None:
            t.ClearField("float_data")
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", "0"), ("length", "4")):
                t.external_data.add(key=key, value=value)
        return t

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Add", ["x", f"w{k}"], [f"a{k}"]) for k in range(len(locations))]
    last = nodes[-1].output[0] if nodes else "x"
    if constant is not None:
        nodes.append(helper.make_node("Constant", [], ["c"], value=tensor("c", constant)))
        nodes.append(helper.make_node("Add", [last, "c"], ["ac"]))
        last = "ac"
    if nested is not None:
        branch = helper.make_graph(
            [helper.make_node("Identity", ["s"], ["out"])],
            "branch",
            [],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
            [tensor("s", nested)],
        )
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        nodes.append(helper.make_node("If", ["cond"], ["b"], then_branch=branch, else_branch=branch))
        nodes.append(helper.make_node("Add", [last, "b"], ["ab"]))
        last, extra = "ab", [cond]
    else:
        extra = []
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "g", [x], [y], [tensor(f"w{k}", loc) for k, loc in enumerate(locations)] + extra)
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=False)
    return path


def test_external_locations_are_every_file_the_graph_names_subgraphs_and_constants_included(tmp_path):
    import onnx

    path = _graph_with_external_data(
        tmp_path / "g.onnx", ["g.onnx.data", "other.data"], nested="sub.data", constant="const.data"
    )
    model = onnx.load(str(path), load_external_data=False)
    by_onnx = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert by_onnx == {"g.onnx.data", "other.data"}
    assert set(external_locations(path)) == {"const.data", "g.onnx.data", "other.data", "sub.data"}  # both branches
    assert external_locations(_graph_with_external_data(tmp_path / "inline.onnx", [None])) == []


@pytest.mark.parametrize("where", ["initializer", "subgraph", "constant"])
@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin", "link/secret.bin"])
def test_a_graph_naming_weights_outside_its_bundle_is_refused(tmp_path, where, location):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.symlink(tmp_path, bundle / "link")  # a folder inside that leads out
    kwargs = {"initializer": {}, "subgraph": {"nested": location}, "constant": {"constant": location}}[where]
    graph = _graph_with_external_data(
        bundle / "unet.onnx", [location] if where == "initializer" else ["unet.onnx.data"], **kwargs
    )
    with pytest.raises(BundleError, match=r"names a file outside its folder .*refusing to read it"):
        check_external_data(graph, bundle)
    check_external_data(_graph_with_external_data(bundle / "ok.onnx", ["ok.onnx.data", "sub/w.bin"]), bundle)


def test_a_bundle_whose_graph_names_weights_outside_it_never_reaches_openvino(models_root, tmp_path, monkeypatch):
    import shutil

    pytest.importorskip("openvino", reason="OpenVINO's runtime is the dev extra's (pip install openvino)")
    from edgediff.runtime import openvino_session as ovs

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("tiny-sd-turbo", models_root), bundle)
    _graph_with_external_data(bundle / "unet.onnx", ["../stolen.bin"])
    given = []
    for method in ("read_model", "compile_model"):  # OpenVINO's two ways of reading a graph file
        real = getattr(ovs.core(), method)
        monkeypatch.setattr(ovs.core(), method, lambda path, *a, real=real: given.append(str(path)) or real(path, *a))
    with pytest.raises(BundleError, match=r"outside its folder \(\.\./stolen\.bin\)"):
        Pipeline.from_bundle(bundle, provider="ov", verify="none", cache=False, fallback=True)  # not a fallback case
    # the graphs the pipeline opened before the UNet were read (so the stand-ins saw calls), the UNet never
    assert given and not any(path.endswith("unet.onnx") for path in given)


@pytest.mark.parametrize("damage", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0f"])
def test_a_graph_file_that_is_not_onnx_is_a_bundle_error(tmp_path, damage):
    path = tmp_path / "unet.onnx"
    path.write_bytes(damage)
    with pytest.raises(BundleError, match="unet.onnx is not a readable ONNX graph"):
        check_external_data(path, tmp_path)
