"""LoRA slots: graphs whose LoRA-targeted layers take adapter weights at run time (`--lora-slots LAYERS`).

Each chosen Linear or Conv layer of the exported graph gets a low-rank side path added to its output, as PEFT
computes a LoRA: Linear `(x @ down) @ up`; Conv a conv with the layer's kernel, strides and pads to `rank`
channels, then a 1x1 conv back (runtime/lora_adapters.py names the inputs and their layouts). `down` and `up`
are graph inputs whose defaults are empty (rank 0) initializers: without an adapter the side path adds exact
zeros, so the graph gives the plain graph's outputs bit for bit (checked here at export), and an onnxruntime
LoRA adapter fills them per run at any rank. The layers are found by the node names the exporter writes,
`/<module path>/<Op>`, which are the names diffusers' LoRA state dicts use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgediff.runtime.errors import ExportValidationError
from edgediff.runtime.lora_adapters import slot_input_names

# which layers take LoRAs, by module-name suffix; "all" is every Linear and Conv with a weight
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
TRANSFORMER = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "fc1", "fc2")
LAYER_SETS = {"attention": ATTENTION, "transformer": TRANSFORMER, "all": None}
# the graphs that get slots: what diffusers loads LoRAs into for UNet families
SLOT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
# a UNet exported through a wrapper module (export/controlnet.py: the UNet taking residuals) has it under `.model`;
# slots are named as diffusers names the layers, which is how LoRA files name them
WRAPPER_SCOPE = "model."
# the export check's random LoRA: rank and size of its weights, and the bound on the side path against the same
# LoRA fused into the weights in numpy (fp32 summation order only; fp16 graphs: half-precision rounding)
CHECK_RANK = 2
CHECK_WEIGHT_SCALE = 0.05
FUSED_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def _module_of(node_name: str) -> tuple[str, str] | None:
    """ "/down_blocks.1/attentions.0/proj_in/Conv" -> ("down_blocks.1.attentions.0.proj_in", "Conv")."""
    if not node_name.startswith("/") or node_name.count("/") < 2:
        return None
    scope, _, op = node_name[1:].rpartition("/")
    return scope.replace("/", ".").removeprefix(WRAPPER_SCOPE), op


def _wanted(module: str, layers: str) -> bool:
    suffixes = LAYER_SETS[layers]
    return suffixes is None or any(module == s or module.endswith("." + s) for s in suffixes)


def _attribute(node, name: str, default):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def plan_slots(model, layers: str) -> list[dict]:
    """The layers of `model` that get a slot: module name, kind, widths, and the tensors the side path joins."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    by_module: dict[str, list] = {}
    for node in model.graph.node:
        found = _module_of(node.name)
        if found:
            by_module.setdefault(found[0], []).append(node)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.name)
    graph_outputs = {o.name for o in model.graph.output}
    slots = []
    for module, nodes in by_module.items():
        weighted = [n for n in nodes if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]
        if len(weighted) != 1 or not _wanted(module, layers):
            continue
        node = weighted[0]
        shape = tuple(inits[node.input[1]].dims)
        if node.op_type == "Conv":
            if _attribute(node, "group", 1) != 1 or len(shape) != 4:
                continue
            slot = {"kind": "conv", "in": shape[1], "out": shape[0], "kernel": list(shape[2:])}
            slot["conv"] = {
                k: list(_attribute(node, k, d))
                for k, d in (("strides", [1, 1]), ("pads", [0, 0, 0, 0]), ("dilations", [1, 1]))
            }
        elif node.op_type == "Gemm":
            if _attribute(node, "transA", 0) or len(shape) != 2:
                continue
            out_features, in_features = shape if _attribute(node, "transB", 0) else shape[::-1]
            slot = {"kind": "linear", "in": in_features, "out": out_features}
        else:
            if len(shape) != 2:
                continue
            slot = {"kind": "linear", "in": shape[0], "out": shape[1]}
        # the module's output: the one tensor of its nodes read outside it (or a graph output)
        names = {n.name for n in nodes}
        leaving = [out for n in nodes for out in n.output if out in graph_outputs or consumers.get(out, set()) - names]
        if len(leaving) != 1:
            continue
        dtype = numpy_helper.to_array(inits[node.input[1]]).dtype
        slots.append({"module": module, **slot, "dtype": dtype.name, "x": node.input[0], "y": leaving[0]})
    return slots


def add_lora_slots(model, layers: str) -> dict:
    """Adds a side path to each planned layer of `model` (in place); returns the manifest record of the slots."""
    from onnx import TensorProto, helper, numpy_helper

    slots = plan_slots(model, layers)
    graph = model.graph
    new_nodes, renamed = [], {}
    for slot in slots:
        module, dtype = slot["module"], np.dtype(slot["dtype"])
        down, up = slot_input_names(module)
        elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
        rank = f"lora_rank_{len(renamed)}"  # each layer's own rank: LoRAs need not touch every layer alike
        if slot["kind"] == "linear":
            shapes = {down: [slot["in"], rank], up: [rank, slot["out"]]}
            empty = {down: (slot["in"], 0), up: (0, slot["out"])}
            ops = [("MatMul", [slot["x"], down], {}), ("MatMul", [None, up], {})]
        else:
            kh, kw = slot["kernel"]
            shapes = {down: [rank, slot["in"], kh, kw], up: [slot["out"], rank, 1, 1]}
            empty = {down: (0, slot["in"], kh, kw), up: (slot["out"], 0, 1, 1)}
            ops = [("Conv", [slot["x"], down], slot["conv"]), ("Conv", [None, up], {})]
        for name in (down, up):
            graph.input.append(helper.make_tensor_value_info(name, elem, shapes[name]))
            graph.initializer.append(numpy_helper.from_array(np.zeros(empty[name], dtype), name))
        prefix = f"/{module.replace('.', '/')}/lora"
        previous = None
        for i, (op, inputs, attrs) in enumerate(ops):
            out = f"{prefix}/{op}_{i}_output_0"
            new_nodes.append(
                helper.make_node(op, [previous or inputs[0], inputs[1]], [out], f"{prefix}/{op}_{i}", **attrs)
            )
            previous = out
        # the layer's output keeps its name, now made by the Add: every reader (graph outputs too) gets the sum
        plain = f"{prefix}/plain_output_0"
        renamed[slot["y"]] = plain
        new_nodes.append(helper.make_node("Add", [plain, previous], [slot["y"]], f"{prefix}/Add"))
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in renamed:
                node.output[i] = renamed[name]
    graph.node.extend(new_nodes)
    record = {
        "layers": layers,
        "dtype": slots[0]["dtype"] if slots else "float32",
        "slots": {
            s["module"]: {k: s[k] for k in ("kind", "in", "out", *(("kernel",) if s["kind"] == "conv" else ()))}
            for s in slots
        },
    }
    if slots:
        _sort_topologically(graph)
    return record


def _sort_topologically(graph) -> None:
    """The side paths were appended after the nodes that read them: put every node after its inputs' makers."""
    made_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    order, state = [], {}

    def visit(i):
        stack = [(i, False)]
        while stack:
            j, done = stack.pop()
            if done:
                state[j] = 2
                order.append(j)
                continue
            if state.get(j):
                continue
            state[j] = 1
            stack.append((j, True))
            for name in graph.node[j].input:
                k = made_by.get(name)
                if k is not None and not state.get(k):
                    stack.append((k, False))

    for i in range(len(graph.node)):
        visit(i)
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def check_slots(component: str, plain_path, slotted_path, record: dict, feeds: dict, precision: str) -> dict:
    """The slotted graph against the plain one on the export check's inputs, in the runtime's session options:
    without adapters the outputs must be identical; with a random LoRA on every slot they must match the plain graph
    with that LoRA fused into its weights (numpy), within FUSED_TOLERANCE. Returns what was measured."""
    import onnx
    import onnxruntime as ort

    from edgediff.runtime.session_config import session_options

    def session(path):
        return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])

    plain = onnx.load(str(plain_path))
    declared = {i.name for i in plain.graph.input}
    feeds = {k: v for k, v in feeds.items() if k in declared}
    reference = session(plain_path).run(None, feeds)
    slotted = session(slotted_path)
    zero = slotted.run(None, feeds)
    exact = all(np.array_equal(a, b) for a, b in zip(reference, zero))
    if not exact:
        diff = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(reference, zero))
        raise ExportValidationError(component, {"without LoRA (must be identical)": (diff, 0.0)})
    adapter, fused = _random_lora(plain, record)
    del plain
    fused_path = Path(slotted_path).with_name(f".lora-check-{component}.onnx")
    # beside the bundle's graph, weights in a file of their own (past 2 GB a graph cannot be one protobuf)
    onnx.save_model(fused, str(fused_path), save_as_external_data=True, location=f"{fused_path.name}.data")
    del fused
    try:
        values = slotted.run(None, {**feeds, **adapter})
        expected = session(fused_path).run(None, feeds)
    finally:
        for f in (fused_path, fused_path.with_name(f"{fused_path.name}.data")):
            f.unlink(missing_ok=True)
    diff = max(
        float(np.abs(a.astype(np.float32) - b).max() / max(1.0, float(np.abs(b).max())))
        for a, b in zip(values, expected)
    )
    tolerance = FUSED_TOLERANCE[precision]
    if not diff <= tolerance:
        raise ExportValidationError(component, {"random LoRA against it fused": (diff, tolerance)})
    return {"identical_without_lora": exact, "max_rel_diff_fused": diff}


def _random_lora(plain, record: dict) -> tuple[dict, object]:
    """A random LoRA on every slot, as adapter values, and a copy of the plain graph with it fused in."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    dtype = np.dtype(record["dtype"])
    fused = onnx.ModelProto()
    fused.CopyFrom(plain)
    slots = {s["module"]: s for s in plan_slots(fused, record["layers"])}
    weights = {}
    for node in fused.graph.node:
        found = _module_of(node.name)
        if found and found[0] in record["slots"] and node.op_type in WEIGHT_OPS:
            weights[found[0]] = node
    inits = {i.name: i for i in fused.graph.initializer}
    adapter = {}
    for module, slot in record["slots"].items():
        down_name, up_name = slot_input_names(module)
        node = weights[module]
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if slot["kind"] == "linear":
            down = rng.normal(0, CHECK_WEIGHT_SCALE, (slot["in"], CHECK_RANK)).astype(np.float32)
            up = rng.normal(0, CHECK_WEIGHT_SCALE, (CHECK_RANK, slot["out"])).astype(np.float32)
            delta = down @ up  # (in, out)
            w = w + (delta.T if node.op_type == "Gemm" and _attribute(node, "transB", 0) else delta)
        else:
            if slot["kernel"] != [1, 1] and slots[module]["conv"]["dilations"] != [1, 1]:
                raise ValueError(f"{module}: dilated convolutions cannot be fused for the check")
            down = rng.normal(0, CHECK_WEIGHT_SCALE, (CHECK_RANK, slot["in"], *slot["kernel"])).astype(np.float32)
            up = rng.normal(0, CHECK_WEIGHT_SCALE, (slot["out"], CHECK_RANK, 1, 1)).astype(np.float32)
            w = w + np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w.astype(dtype), node.input[1]))
        adapter[down_name], adapter[up_name] = down.astype(dtype), up.astype(dtype)
    return adapter, fused


def slot_graph(component: str, staging: Path, layers: str, feeds: dict, precision: str, save) -> tuple[dict, dict]:
    """Replaces the bundle's checked graph of `component` by its slotted form, checked against it (check_slots).
    `save(model, folder, name)` writes a graph as the bundle writer does and returns its manifest `files`.
    Returns the new `files` and the manifest record (with what the check measured)."""
    import shutil

    import onnx

    plain_path = staging / f"{component}.onnx"
    model = onnx.load(str(plain_path))
    record = add_lora_slots(model, layers)
    if not record["slots"]:
        raise ValueError(f"{component}: no layer matches --lora-slots {layers}")
    work = staging / f".lora-slots-{component}"
    work.mkdir()
    files = save(model, work, component)
    del model
    record["check"] = check_slots(component, plain_path, work / f"{component}.onnx", record, feeds, precision)
    for old in (plain_path, plain_path.with_name(f"{plain_path.name}.data")):
        old.unlink(missing_ok=True)
    for name in files:
        (work / name).replace(staging / name)
    shutil.rmtree(work)
    return files, record
