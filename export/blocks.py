"""A graph's blocks, the fp32 tensors at their boundaries, each block's quantisation error, and what a block's
error does to the graph's output.

The sensitivity pass (quantize.py) measures each block's quantisation error on the inputs the fp32 graph
really gives it: the whole graph runs once per feed with every block-boundary tensor as an extra output
(kept on disk), then the graph, quantised whole once, runs cut at those boundaries: every block reads the
recorded fp32 tensors, so its outputs are what it gives quantised alone. The difference it makes to its outputs
can then be added to the fp32 graph at those outputs, for any set of blocks at once: one run of the graph (or of
the tail of it that the set's errors reach, fed the recorded tensors at its edge) says what that set's quantisation
does to the graph's output, with no graph quantised.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger("edgediff.export")


@dataclass(frozen=True)
class Block:
    name: str
    nodes: tuple[int, ...]  # indices into the graph's nodes, in graph order (the constants it reads included)
    inputs: tuple[str, ...]  # tensors it reads from outside itself: graph inputs, other nodes' outputs
    outputs: tuple[str, ...]  # tensors it hands to other nodes or to the graph's outputs


def tensors_read(node) -> Iterator[str]:
    """The tensors a node reads, outer-scope names in its subgraphs (If, Loop) included."""
    yield from node.input
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            own = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
            own |= {t.name for t in graph.initializer}
            for inner in graph.node:
                yield from (name for name in tensors_read(inner) if name not in own)


def split_blocks(graph, names: Iterable[str], block_of: Callable[[str], str]) -> dict[str, Block]:
    """The blocks `names` of `graph`: each block's nodes are those whose block_of(node name) is its name."""
    wanted = set(names)
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    producer: dict[str, int] = {}
    consumers: dict[str, set[int]] = defaultdict(set)
    members: dict[str, set[int]] = defaultdict(set)
    for i, node in enumerate(graph.node):
        producer.update((o, i) for o in node.output)
        for t in tensors_read(node):
            consumers[t].add(i)
        if block_of(node.name) in wanted:
            members[block_of(node.name)].add(i)
    blocks = {}
    for name, inside in members.items():
        # constants the block reads travel with it (the exporter names many at the root scope)
        for i in list(inside):
            for t in tensors_read(graph.node[i]):
                j = producer.get(t)
                if j is not None and graph.node[j].op_type == "Constant" and not graph.node[j].input:
                    inside.add(j)
        order = sorted(inside)
        produced = {o for i in order for o in graph.node[i].output}
        reads = dict.fromkeys(t for i in order for t in tensors_read(graph.node[i]) if t and t not in produced)
        # what it hands on (a constant read elsewhere too is no output: it is the same in any precision)
        outputs = [
            t
            for i in order
            if graph.node[i].op_type != "Constant"
            for t in graph.node[i].output
            if t and (t in graph_outputs or consumers[t] - inside)
        ]
        blocks[name] = Block(
            name,
            tuple(order),
            tuple(t for t in reads if t not in initializers),
            tuple(outputs),
        )
    return blocks


class BlockProbe:
    """Blocks of one fp32 graph: the tensors at their boundaries, recorded once for a few feeds; each block's
    quantisation error and its difference from fp32 (its delta), from one run of the quantised graph cut at
    those boundaries (`errors`); and runs of the graph (or of its tail) with the deltas of chosen blocks added
    (`output_power`).

    `structure` is the graph with its weights in external data, not loaded (onnx.load(...,
    load_external_data=False)): variants of it are saved beside `src` and opened.
    """

    def __init__(self, src: Path, structure, blocks: dict[str, Block], workdir: Path):
        self.src, self.structure, self.blocks, self.workdir = Path(src), structure, blocks, Path(workdir)
        graph_inputs = {v.name for v in structure.graph.input}
        self.boundary = list(
            dict.fromkeys(t for b in blocks.values() for t in (*b.inputs, *b.outputs) if t not in graph_inputs)
        )
        self._index = {name: i for i, name in enumerate(self.boundary)}
        self._feeds: list[dict] = []
        self.dtypes: dict[str, np.dtype] = {}
        self._session = None
        self._clean: list[np.ndarray] = []  # the graph's first output per feed, from the injection graph
        self._injection = None  # the injection graph's structure (its weights outside it), once opened
        self._tails: dict[frozenset, _Tail] = {}  # tails opened, by the nodes a group's errors reach
        self._plans: dict[frozenset, tuple | None] = {}  # _TailWalk.tail's plan of each tail asked for
        self._walk = None  # _TailWalk over the injection graph: producers, readers and weights of its tensors

    def _save_beside_source(self, model, tag: str) -> Path:
        """Saves a variant of the structure beside the source graph, where its external-data paths hold."""
        import onnx

        path = self.src.with_name(f".{self.src.stem}.{tag}.onnx")
        onnx.save_model(model, str(path))
        return path

    def _open(self, model, tag: str):
        from .ort_sessions import measuring_options, measuring_session

        path = self._save_beside_source(model, tag)
        try:
            # the deltas are overridable initializers on purpose: no warning for each
            return measuring_session(path, options=measuring_options(quiet=True))
        finally:
            path.unlink(missing_ok=True)

    def record(self, feeds: list[dict]) -> None:
        """Runs the fp32 graph on `feeds` with every boundary tensor as an output, keeping them on disk. Where the
        graph's types say which block outputs are float (shape inference on the weightless structure), it runs as
        the injection graph (no delta fed: fp32), whose session then stays open for output_power: one opening of
        the fp32 graph, not two (about 1.5 s each for full-size SD-Turbo's UNet and text encoder), and the graph's
        own output from the same runs."""
        typed = _types(self.structure, {t for b in self.blocks.values() for t in b.outputs})
        if typed is not None:
            self.dtypes.update(typed)
            self._open_injection(fetch_boundary=True)
            session, fetched = self._session, [*self.boundary, self._output]
        else:  # a graph onnx cannot type (onnxruntime's own operators): the dtypes come from the recording
            session, fetched = self._open(self._with_outputs(self.structure, self.boundary), "probe"), self.boundary
        self._clean = []
        for k, feed in enumerate(feeds):
            folder = self.workdir / f"feed-{k}"
            folder.mkdir(parents=True, exist_ok=True)
            values = session.run(fetched, feed) if fetched else []
            if typed is not None:
                self._clean.append(values.pop())
            for i, value in enumerate(values):
                np.save(folder / f"{i}.npy", value)
                self.dtypes.setdefault(self.boundary[i], value.dtype)
            del values
            for name, value in feed.items():
                self.dtypes.setdefault(name, np.asarray(value).dtype)
        del session
        gc.collect()
        self._feeds = list(feeds)

    @staticmethod
    def _with_outputs(model, names: list[str]):
        """A copy of `model`'s message with `names` among its outputs (untyped: onnxruntime infers the types)."""
        import onnx

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        present = {o.name for o in copy.graph.output}
        for name in names:
            if name not in present:
                copy.graph.output.add().name = name
        return copy

    def value(self, name: str, k: int) -> np.ndarray:
        """Tensor `name` of recorded feed `k`: a graph input or a boundary tensor (memory-mapped)."""
        if name in self._feeds[k]:
            return self._feeds[k][name]
        return np.load(self.workdir / f"feed-{k}" / f"{self._index[name]}.npy", mmap_mode="r")

    def _delta_path(self, name: str, k: int) -> Path:
        return self.workdir / f"feed-{k}" / f"delta-{self._index[name]}.npy"

    def float_outputs(self, block: str) -> list[str]:
        return [t for t in self.blocks[block].outputs if np.issubdtype(self.dtypes[t], np.floating)]

    def errors(self, quantised: Path, ahead=None) -> dict[str, float]:
        """Each block's relative RMS error at its float outputs, quantised, against the fp32 graph's, on the recorded
        tensors at its inputs; keeps the differences (the blocks' deltas) for output_power. `quantised`: the whole
        graph quantised with no block kept. It runs cut at every block boundary: each boundary tensor is fed (its
        fp32 recording) to the nodes that read it, and what its producer makes is an output of its own. So one run
        per feed gives every block's quantised outputs on fp32 inputs: the block quantised alone, without a graph,
        a quantisation and a session per block (the full-size SD-Turbo UNet's 50 blocks: 28 s of its ranking).
        A rounding the quantiser puts on a tensor between blocks counts in the blocks that read it, where they read
        it directly (its producer's output is fetched before it).

        onnxruntime computes every node whatever is fetched, and returns a run's outputs together: blocks whose
        outputs would exceed MAX_FETCH_BYTES in one run (a decoder at 1024: 0.5 GB a tensor) are run in groups, each
        on the cut graph pruned to the nodes its outputs need. `ahead`: open_ahead's session of one group of every
        block, used where the recorded sizes make one group (and it opened), else let go."""
        wanted = {b: self.float_outputs(b) for b in self.blocks}
        power = {b: [0.0, 0.0] for b in self.blocks}  # error and reference power, summed over feeds
        if not any(wanted.values()):
            if ahead is not None:
                ahead.drop()
            return {b: 0.0 for b in self.blocks}
        model = None
        for group in _fetch_groups(wanted, lambda t: self.value(t, 0).nbytes):
            fetched = [t for b in group for t in wanted[b]]
            session = None
            if ahead is not None:  # only the first group can be the one opened ahead
                session = ahead.take() if ahead.fetched == fetched else None
                ahead.drop()
                ahead = None
            if session is None:
                model = model or self._cut_model(quantised)
                session = self._open_pruned(model, fetched, quantised)
            fed = [v.name for v in session.get_inputs()]  # those the pruned graph still reads
            for k in range(len(self._feeds)):
                outputs = session.run([_QUANTISED + t for t in fetched], {t: self.value(t, k) for t in fed})
                got = dict(zip(fetched, outputs))
                del outputs
                for block in group:
                    for name in wanted[block]:
                        ref = np.asarray(self.value(name, k))
                        delta = got.pop(name) - ref
                        np.save(self._delta_path(name, k), delta)
                        power[block][0] += float(np.sum(delta.astype(np.float64) ** 2))
                        power[block][1] += float(np.sum(ref.astype(np.float64) ** 2))
                        del delta
            del session
            gc.collect()
        return {b: float(np.sqrt(num / max(den, 1e-30))) for b, (num, den) in power.items()}

    def open_ahead(self, quantised: Path, pool, feed: dict):
        """Opens on `pool` (a thread) the cut graph's session for every block's float outputs, which errors() runs
        where they make one group, so that it opens beside other work (record() running the fp32 graph): opening a
        session is mostly one core's work (the full-size SD-Turbo UNet's cut int8 graph 1.6-3.6 s, its injection
        graph 1.6-1.8 s).
        Returns an _OpenedAhead (the tensors fetched, the session once open); None where onnx's inference leaves a
        boundary tensor untyped (their types then come from the recording), or where the outputs' least sizes on
        `feed` (the first recorded; a dimension inference leaves unknown counted as 1) already make several groups."""
        typed = _types(self.structure, set(self.boundary))
        if typed is None:
            return None
        self.dtypes.update(typed)
        wanted = {b: self.float_outputs(b) for b in self.blocks}
        fetched = [t for names in wanted.values() for t in names]
        shapes = _shapes(self.structure, feed, set(fetched))

        def least(name: str) -> int:
            if name not in shapes:  # a tensor inference cannot shape: none at least
                return 0
            return math.prod(1 if d is None else d for d in shapes[name]) * self.dtypes[name].itemsize

        if not fetched or len(_fetch_groups(wanted, least)) > 1:
            return None
        return _OpenedAhead(pool, fetched, lambda: self._open_pruned(self._cut_model(quantised), fetched, quantised))

    def _cut_model(self, quantised: Path):
        """The whole quantised graph's structure cut at every block boundary: each boundary tensor an input, what its
        producer makes renamed (_QUANTISED) so that its readers read the fed tensor."""
        import onnx
        from onnx import helper

        model = onnx.load(str(quantised), load_external_data=False)  # weights stay beside it (large graphs)
        cut = set(self.boundary)
        for node in model.graph.node:
            for i, name in enumerate(node.output):
                if name in cut:
                    node.output[i] = _QUANTISED + name
        model.graph.input.extend(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(self.dtypes[name]), None)
            for name in self.boundary
        )
        return model

    def _open_pruned(self, model, fetched: list[str], quantised: Path):
        """A session of the cut graph `model` with `fetched` (quantised names) as its outputs and only the nodes,
        inputs and weights they need, saved beside `quantised` (where its external-data paths hold) while it opens."""
        import onnx
        import onnxruntime as ort
        from onnx import helper

        from .ort_sessions import runtime_options

        graph = model.graph
        needed = {_QUANTISED + t for t in fetched}
        nodes = []
        for node in reversed(graph.node):  # graph order is topological: a walk back finds every node needed
            if any(o in needed for o in node.output):
                nodes.append(node)
                needed.update(tensors_read(node))
        pruned = helper.make_graph(
            list(reversed(nodes)),
            graph.name,
            [v for v in graph.input if v.name in needed],
            [helper.make_empty_tensor_value_info(_QUANTISED + t) for t in fetched],
            [t for t in graph.initializer if t.name in needed],
        )
        sub = helper.make_model(pruned, opset_imports=list(model.opset_import))
        sub.ir_version = model.ir_version
        sub.functions.extend(model.functions)
        path = quantised.with_name(f".{quantised.stem}.cut.onnx")
        onnx.save_model(sub, str(path))
        del sub, pruned
        try:
            return ort.InferenceSession(str(path), runtime_options(), providers=["CPUExecutionProvider"])
        finally:
            path.unlink(missing_ok=True)

    def output_power(self, blocks: list[str]) -> float:
        """The graph's output error, squared and relative to the fp32 output (as the whole-graph check
        measures it), with the deltas of `blocks` added at their outputs: their quantisation's effect, to
        first order, with every other block in fp32. Opens the injection graph on first use (close()); runs its
        tail alone where the blocks' errors reach only the tail (TAIL_MAX_WEIGHT_SHARE)."""
        if self._session is None:
            self._open_injection()
        tail = self._tail(blocks)
        num = den = 0.0
        for k, clean in enumerate(self._clean):
            deltas = {
                _DELTA + name: np.load(self._delta_path(name, k), mmap_mode="r")
                for b in blocks
                for name in self.float_outputs(b)
            }
            if tail is None:
                got = self._session.run([self._output], {**self._feeds[k], **deltas})[0]
            else:  # the tail's edge fed from the recording: the fp32 values the whole graph computes there
                feed = {n: self._feeds[k][n] if n in self._feeds[k] else self.value(_recorded(n), k) for n in tail.fed}
                feed.update((n, v) for n, v in deltas.items() if n in tail.reads)
                got = tail.session.run([self._output], feed)[0]
            num += float(np.sum((got.astype(np.float64) - clean) ** 2))
            den += float(np.sum(clean.astype(np.float64) ** 2))
        return num / max(den, 1e-30)

    def _tail(self, blocks: list[str]) -> _Tail | None:
        """The tail of the injection graph that `blocks`' errors reach, opened (or taken from those opened before);
        None where the whole graph is to run: the tail would hold more than TAIL_MAX_WEIGHT_SHARE of its weights, or
        leave no node out. The tail holds every node downstream of the blocks' delta additions, and of the nodes
        before them those it needs whose outputs the recording has not: the fp32 tensors at the block boundaries it
        reads are fed from the recording instead (a block output's value before its addition is the recorded one: no
        delta is added in the recording)."""
        walk = self._walk = self._walk or _TailWalk(self._injection.graph)
        reached = walk.downstream([walk.producer[name] for b in blocks for name in self.float_outputs(b)])
        if reached not in self._plans:
            self._plans[reached] = walk.tail(self._output, reached, lambda t: _recorded(t) in self._index)
        plan = self._plans[reached]
        if plan is None or plan[2] > TAIL_MAX_WEIGHT_SHARE * walk.weight_bytes:
            return None
        if reached not in self._tails:
            self._tails[reached] = self._open_tail(*plan)
            while sum(t.weight_bytes for t in self._tails.values()) > TAIL_MAX_WEIGHT_SHARE * walk.weight_bytes:
                del self._tails[next(iter(self._tails))]  # the oldest: the tails held at once share that budget
        return self._tails[reached]

    def _open_tail(self, nodes: list[int], fed: list[str], weight_bytes: int) -> _Tail:
        """A session of the injection graph's `nodes` (indices, in graph order) with `fed` among its inputs, typed as
        recorded, and the graph's own inputs they read; saved beside the source while it opens."""
        from onnx import helper

        from .ort_sessions import measuring_options, measuring_session

        graph = self._injection.graph
        kept = [graph.node[i] for i in nodes]
        reads = {t for node in kept for t in tensors_read(node)}
        inputs = [
            helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(self.dtypes[_recorded(t)]), None)
            for t in fed
        ]
        inputs += [v for v in graph.input if v.name in reads and v.name not in fed]
        tail = helper.make_graph(
            kept,
            graph.name,
            inputs,
            [o for o in graph.output if o.name == self._output],
            [t for t in graph.initializer if t.name in reads],
        )
        model = helper.make_model(tail, opset_imports=list(self._injection.opset_import))
        model.ir_version = self._injection.ir_version
        model.functions.extend(self._injection.functions)
        path = self._save_beside_source(model, f"tail-{len(nodes)}")
        try:
            # run a time or two: no packed copies of its matrices (measuring_options)
            session = measuring_session(path, options=measuring_options(quiet=True, once=True))
        finally:
            path.unlink(missing_ok=True)
        own_inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
        return _Tail(session, [*fed, *(t for t in reads if t in own_inputs and t not in fed)], reads, weight_bytes)

    def _open_injection(self, fetch_boundary: bool = False) -> None:
        """The fp32 graph with an Add after every float block output: output + delta, where delta is an
        input defaulting to a scalar 0 (an initializer of the same name), so that unfed blocks stay fp32.
        `fetch_boundary`: every boundary tensor an output too (record's runs)."""
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.structure)
        graph = model.graph
        self._output = graph.output[0].name
        injected = {t: self.dtypes[t] for b in self.blocks for t in self.float_outputs(b)}
        nodes = []
        for original in graph.node:
            node = onnx.NodeProto()
            node.CopyFrom(original)
            nodes.append(node)
            for i, name in enumerate(node.output):
                if name in injected:  # the producer's output renamed; the Add makes the name its readers read
                    node.output[i] = _FP32 + name
                    nodes.append(helper.make_node("Add", [_FP32 + name, _DELTA + name], [name], name=_DELTA + name))
                    elem = helper.np_dtype_to_tensor_dtype(injected[name])
                    graph.input.append(helper.make_tensor_value_info(_DELTA + name, elem, None))
                    graph.initializer.append(numpy_helper.from_array(np.zeros((), injected[name]), _DELTA + name))
        del graph.node[:]
        graph.node.extend(nodes)
        self._injection = model
        if fetch_boundary:
            model = self._with_outputs(model, self.boundary)
        self._session = self._open(model, "injection")
        del model
        if not self._clean:
            self._clean = [self._session.run([self._output], feed)[0] for feed in self._feeds]

    def close(self) -> None:
        """Lets the injection graph's session and its tails' go (they hold the fp32 weights)."""
        from .quantize import release_memory

        self._session = None
        self._tails.clear()
        release_memory()


def _inferred(model, feed: dict | None = None) -> list | None:
    """The value infos onnx's shape inference gives `model` (a graph without its weights in the message: inference
    reads the weights' types and shapes alone), its inputs, outputs and tensors between; with the graph's dynamic
    input dimensions set to `feed`'s where given. None where inference fails."""
    import onnx

    if feed:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        for value in fixed.graph.input:
            for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(feed.get(value.name, ()))):
                if not dim.HasField("dim_value"):
                    dim.dim_value = size
        model = fixed
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        return None
    return [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]


def _types(model, names: set[str]) -> dict[str, np.dtype] | None:
    """The element types of tensors `names` of `model` (weights not in the message), from onnx's shape inference;
    None where one is left untyped (the types then come from a recording)."""
    from onnx import helper

    values = _inferred(model)
    if values is None:
        return None
    elems = {v.name: v.type.tensor_type.elem_type for v in values if v.name in names}
    if any(not elems.get(name) for name in names):
        return None
    return {name: np.dtype(helper.tensor_dtype_to_np_dtype(elem)) for name, elem in elems.items()}


def _shapes(model, feed: dict, names: set[str]) -> dict[str, tuple]:
    """The shapes of tensors `names` of `model` (weights not in the message) by onnx's shape inference with the
    graph's dynamic input dimensions set to `feed`'s; a dimension it leaves unknown is None, a tensor it cannot
    shape is left out ({} where inference fails)."""
    return {
        v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
        for v in _inferred(model, feed) or ()
        if v.name in names and v.type.tensor_type.HasField("shape")
    }


class _OpenedAhead:
    """A session opened on a thread (BlockProbe.open_ahead) for `fetched`, held by this object alone until taken
    (take) or let go (drop): a future's result would keep it for as long as the future is referenced."""

    def __init__(self, pool, fetched: list[str], open_session: Callable):
        self.fetched = fetched
        self._opening = pool.submit(lambda: [open_session()])

    def take(self):
        """The session (waits for it); None where it failed to open: the caller then opens what it needs itself,
        which raises where the failure was not the whole graph's alone (memory, say)."""
        try:
            held = self._opening.result()
        except Exception as exc:
            log.info("the cut graph opened ahead failed (%s): opening it by groups", exc)
            return None
        return held.pop() if held else None

    def drop(self) -> None:
        """Waits for the opening to end, and lets its session go."""
        if self._opening.exception() is None:
            self._opening.result().clear()


_FP32, _DELTA, _QUANTISED = "edgediff_fp32/", "edgediff_delta/", "edgediff_quantised/"
# A group of blocks whose errors reach only the graph's last nodes (a UNet's last up blocks, where the ranking's
# halving goes most) is measured on that tail of the graph alone, its edge fed the recorded fp32 tensors: the full-size
# SD-Turbo UNet's tails from its third up block's second resnet on hold under a tenth of its weights and ran in
# 0.06-0.43 s against about 1 s for the whole graph (32x32 latents, 2 cores). Only tails with at most this share of
# the graph's weights: a tail's session maps its weights beside the whole graph's, which the ranking keeps open for the
# groups that reach further back, and the tails held at once share this budget.
TAIL_MAX_WEIGHT_SHARE = 0.25


def _recorded(tensor: str) -> str:
    """The recorded tensor whose value `tensor` of the injection graph has: a block output before its delta's addition
    is the output itself (the recording adds none)."""
    return tensor[len(_FP32) :] if tensor.startswith(_FP32) else tensor


@dataclass
class _Tail:
    """A session of the injection graph's tail (BlockProbe._tail): the tensors it is fed (recorded, and the graph's
    inputs it reads), the tensors its nodes read (the deltas among them are fed) and its weights' bytes."""

    session: object
    fed: list[str]
    reads: set[str]
    weight_bytes: int


class _TailWalk:
    """The injection graph's structure as BlockProbe._tail walks it: each tensor's producer and readers (node
    indices) and the graph's weight bytes (external data lengths: no weight is read)."""

    def __init__(self, graph):
        from .segments import initializer_bytes

        self.graph = graph
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(graph.node):
            self.producer.update((o, i) for o in node.output)
            for t in tensors_read(node):
                self.readers[t].append(i)
        self.sizes = {t.name: initializer_bytes(t) for t in graph.initializer}
        self.weight_bytes = sum(self.sizes.values())

    def downstream(self, start: list[int]) -> frozenset:
        """The nodes `start` and every node reading what they make, transitively."""
        seen, todo = set(), list(start)
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo.extend(r for o in self.graph.node[i].output for r in self.readers.get(o, ()))
        return frozenset(seen)

    def tail(self, output: str, reached: frozenset, recorded: Callable[[str], bool]):
        """(nodes, fed tensors, weight bytes) of the tail computing `output`: the `reached` nodes and those they need,
        walking back until a tensor made outside `reached` is `recorded`, which is fed instead; None where nothing
        before the reached nodes is left out, or the reached nodes do not make `output`."""
        nodes, fed, seen, todo = set(), [], set(), [output]
        while todo:
            t = todo.pop()
            if not t or t in seen:
                continue
            seen.add(t)
            i = self.producer.get(t)
            if i is None:  # a graph input or a weight
                continue
            if i not in reached and recorded(t):
                fed.append(t)
                continue
            nodes.add(i)
            todo.extend(tensors_read(self.graph.node[i]))
        # a node kept for one output makes its others too (a recorded one among them is not fed as well)
        fed = [t for t in fed if self.producer[t] not in nodes]
        if not fed or not nodes:
            return None
        weights = {t for i in nodes for t in tensors_read(self.graph.node[i]) if t in self.sizes}
        return sorted(nodes), sorted(fed), sum(self.sizes[t] for t in weights)


# The most bytes of block outputs one run of the cut graph returns (BlockProbe.errors): the full-size SD-Turbo UNet's
# at 256x256 are tens of MB, one run; SANA's DC-AE decoder's at 1024 several GB (0.5 GB a tensor), in groups.
MAX_FETCH_BYTES = 1 << 30


def _fetch_groups(wanted: dict[str, list[str]], size) -> list[list[str]]:
    """The blocks of `wanted` (block -> its float outputs), in order, in groups whose outputs (`size(tensor)`: bytes)
    stay within MAX_FETCH_BYTES; a block larger than that alone; blocks without float outputs left out."""
    groups: list[list[str]] = []
    total = 0
    for block, names in wanted.items():
        if not names:
            continue
        nbytes = sum(size(t) for t in names)
        if not groups or total + nbytes > MAX_FETCH_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(block)
        total += nbytes
    return groups
