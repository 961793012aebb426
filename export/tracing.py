"""Settings both targets share while PyTorch traces or exports the source's modules."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .specs import is_spatial


def quiet_tracing() -> None:
    """Silences the tracer's notes about Python control flow in diffusers' modules: they say nothing to
    our users, since every graph is checked against PyTorch after export."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def trace_context(reduced):
    """The size a graph with dynamic height and width is traced at: the check's reduced grid
    (specs.check_context) plus 8 latent cells, kept a multiple of 8 cells so that every downsampling stays
    whole. Tracing at the bundle's size cost more than the rest of the fp32 export for the VAE (optimum
    traces its encoder at the config's sample_size, 768 px, batch 2); any other size gives the same graph,
    and a trace size other than the check's lets the check prove that height and width stay dynamic."""
    import dataclasses

    from .specs import CHECK_CELL_MULTIPLE

    scale = reduced.vae_scale_factor

    def side(pixels: int) -> int:
        cells = -(-(pixels // scale) // CHECK_CELL_MULTIPLE) * CHECK_CELL_MULTIPLE
        return (cells + CHECK_CELL_MULTIPLE) * scale

    return dataclasses.replace(reduced, height=side(reduced.height), width=side(reduced.width))


def trace_on_inputs(export_config, inputs: dict) -> None:
    """Makes optimum trace `export_config`'s graph on `inputs` (name -> numpy array, e.g. the component's
    random inputs at trace_context) for its inputs with dynamic height and width (specs.is_spatial: FLUX's packed
    image tokens too, so that its position ids match them), instead of its own dummy
    inputs sized from the model's config. Other inputs keep optimum's dummies."""
    import torch

    original = export_config.generate_dummy_inputs
    spatial = {name for name, axes in export_config.inputs.items() if is_spatial(axes) and name in inputs}

    def generate(framework: str = "pt", **shapes):
        dummies = original(framework=framework, **shapes)
        for name in spatial & set(dummies):
            dummies[name] = torch.from_numpy(inputs[name]) if framework == "pt" else inputs[name]
        return dummies

    export_config.generate_dummy_inputs = generate  # an instance attribute over the class's method


def fix_dynamic_axes(export_config, graph: Path) -> bool:
    """optimum's OnnxConfig.fix_dynamic_axes on `graph`, where it can change something: it opens the graph in
    onnxruntime (the full-size UNet's 3.4 GB read, about a second) to find output axes the exporter left dynamic under
    names the config does not declare, and fixes them from a run. The graph's own output shapes say whether there are
    any: every axis a number or a declared name, and onnxruntime's shape inference keeps them so. An output without a
    declared shape, or an axis neither named nor numbered, goes to optimum's fix. Returns whether it ran."""
    import onnx

    declared = {
        axis for spec in (*export_config.inputs.values(), *export_config.outputs.values()) for axis in spec.values()
    }
    outputs = onnx.load(str(graph), load_external_data=False).graph.output
    settled = all(
        output.type.tensor_type.HasField("shape")
        and all(
            dim.dim_param in declared if dim.HasField("dim_param") else dim.HasField("dim_value")
            for dim in output.type.tensor_type.shape.dim
        )
        for output in outputs
    )
    if not settled:
        export_config.fix_dynamic_axes(graph)
    return not settled


@contextmanager
def released_after_export(release, beside_past: int | None = None, scattered: bool = False):
    """Runs `release()` (freeing the module's weights) as soon as PyTorch has written a graph inside optimum's
    export_models, then gathers a large graph's external data (PyTorch writes one file per weight) into the one
    file optimum would, tensor by tensor, or moves a graph's weights past `beside_past` bytes out of it
    (gather_external_data; `scattered`: a large graph's weights are left in their files, for a graph the export
    replaces). optimum's own gathering loads every weight of the graph at once: with the module still
    alive the stage held its weights twice (the fp32 export's peak: the UNet's stage of full-size SD-Turbo), and
    even without it, 1.6x a Gemma-2's. Scoped: torch.onnx.export and optimum's external-data test are restored on
    exit. Hand-written because optimum offers no hook between its two steps."""
    import torch
    from optimum.exporters.onnx import convert

    original, uses_external = torch.onnx.export, convert.check_model_uses_external_data

    def export_then_release(*args, **kwargs):
        try:
            result = original(*args, **kwargs)
        finally:
            release()
        f = kwargs.get("f", args[2] if len(args) > 2 else None)  # where the graph was written (optimum: a path)
        if isinstance(f, (str, Path)):
            gather_external_data(Path(f), beside_past, scattered)
        return result

    torch.onnx.export = export_then_release
    # gathered already: optimum's test then finds nothing to gather (its graph loads with external data still)
    convert.check_model_uses_external_data = lambda model: False
    try:
        yield
    finally:
        torch.onnx.export, convert.check_model_uses_external_data = original, uses_external


def external_bytes(tensor, folder: Path) -> bytes:
    """The bytes of a tensor kept in external data, read from its file in `folder`."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    with open(Path(folder) / info.location, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length) if info.length else f.read()


def copy_external(tensor, folder: Path, sink) -> int:
    """Appends the bytes of a tensor kept in external data (its file in `folder`) to `sink`, a binary file open for
    writing without a buffer (buffering=0: its position is the file's own); returns how many. In the kernel where the
    system offers it (os.copy_file_range: Linux), else read and written. Hand-written for speed: the full-size UNet's
    3.3 GB of fp32 weights copied a tensor at a time took 1.6 s this way against 10.6 s read and written, most of it
    page faults on Python's fresh buffers."""
    import os

    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    with open(Path(folder) / info.location, "rb") as f:
        offset = info.offset or 0
        length = info.length if info.length else os.fstat(f.fileno()).st_size - offset
        copied = 0
        if hasattr(os, "copy_file_range"):
            try:
                while copied < length:
                    step = os.copy_file_range(f.fileno(), sink.fileno(), length - copied, offset + copied)
                    if step == 0:  # the source ends early: short, as a read would be
                        break
                    copied += step
            except OSError:  # a kernel or file system without it (ENOSYS, EXDEV, EINVAL): the rest read and written
                pass
        if copied < length:
            f.seek(offset + copied)
            rest = f.read(length - copied)
            write_all(sink, rest)
            copied += len(rest)
    return copied


def append_external(tensor, folder: Path, sink, location: str, placed=None) -> None:
    """Copies a tensor kept in external data (its file in `folder`) to the end of `sink` (copy_external's), the data
    file named `location`, and points `placed` (default: the tensor itself) at the copy."""
    start = sink.tell()
    place_external(tensor if placed is None else placed, location, start, copy_external(tensor, folder, sink))


def append_bytes(tensor, data, sink, location: str) -> None:
    """Writes `data`, a tensor's bytes, to the end of `sink` (open without a buffer), the data file named `location`,
    and points the tensor at them."""
    place_external(tensor, location, sink.tell(), len(data))
    write_all(sink, data)


def inline_weight_bytes(model) -> int:
    """The bytes of weights a graph holds in its own message (the bundle's rule for keeping them beside it,
    bundle_writer.WEIGHTS_BESIDE_BYTES, counts these)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def write_all(sink, data) -> None:
    """Writes all of `data` to a file open without a buffer, whose write may take less than it is given."""
    view = memoryview(data)
    while view:
        view = view[sink.write(view) :]


def place_external(tensor, location: str, offset: int, length: int) -> None:
    """Points a tensor at `length` bytes from `offset` of the file `location`, its data no longer in the message.
    onnx's set_external_data wants the bytes in the message: the entries are written as it writes them."""
    from onnx import TensorProto

    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def gather_external_data(graph: Path, beside_past: int | None = None, scattered: bool = False) -> None:
    """Moves the external data of `graph`'s tensors (initializers and Constant attributes) into one file beside it,
    `<graph name>_data` as optimum names it, one tensor in memory at a time; the files they came from are removed.
    A graph without external data is left as it is, unless its weights pass `beside_past` bytes: they are then
    moved out of it into that file, as the bundle will keep them (bundle_writer.WEIGHTS_BESIDE_BYTES). PyTorch writes
    a graph under 2 GB whole, and the export reads it three times more before it enters the bundle (optimum's
    test for external data, the output axes, the graph's own rewrites): the full-size SD-Turbo text encoder's
    1.4 GB were parsed out of it each time, 1.2-2 s a reading; with its weights beside it, each reads the structure
    alone, and the bundle takes the weights file by moving it. `scattered`: a graph with external data keeps PyTorch's
    files, one a weight, which the bundle then takes as they are (bundle_writer._move_weights): for a graph the export
    quantises and replaces, whose gathering copied the full-size SD-Turbo UNet's 3.4 GB in 8.6 s on 2 AVX2 cores."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(graph), load_external_data=False)
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    name = f"{graph.name}_data"
    if external and scattered:
        return
    if not external:
        if beside_past is not None and inline_weight_bytes(model) > beside_past:
            (graph.parent / name).unlink(missing_ok=True)  # onnx appends to a file already there
            onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True, location=name)
        return
    gathered = graph.parent / f"{name}.gathering"  # not `name`: a source file may already bear it
    sources = set()
    with open(gathered, "wb", buffering=0) as out:
        for tensor in external:
            sources.add(ExternalDataInfo(tensor).location)
            append_external(tensor, graph.parent, out, name)
    for source in sources:
        (graph.parent / source).unlink()
    gathered.replace(graph.parent / name)
    onnx.save(model, str(graph))
