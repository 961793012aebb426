"""The sensitivity pass of `keep="auto"`: ranges calibrated once, blocks measured on recorded block-boundary
tensors, the kept set checked on the whole graph (quantize.py, blocks.py)."""

import math

import pytest
from tiny_models import tiny_bundle

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def unet_feeds(models_root):
    from edgediff.export.calibration import record_feeds

    bundle = tiny_bundle("tiny-sd1", models_root)
    return bundle / "unet.onnx", record_feeds(bundle, prompts=["a cat", "a dog"])["unet"]


def _count_calls(monkeypatch, cls, method: str) -> list:
    calls = []
    real = getattr(cls, method)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counted)
    return calls


def test_ranges_are_calibrated_once_however_many_blocks_are_tried(unet_feeds, tmp_path, monkeypatch):
    """One calibration per component and one placement of QDQ nodes on those ranges, whatever is tried and checked
    (quantize_static, which calibrates again each time, is never called)."""
    import onnxruntime.quantization as ortq
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    from edgediff.export import quantize as quantize_module
    from edgediff.export.quantize import SCHEMES, quantize_component

    src, feeds = unet_feeds
    everything = quantize_component(src, tmp_path / "all.onnx", SCHEMES["int8-static"], feeds)
    calibrated, calibrate = [], quantize_module.calibrate
    monkeypatch.setattr(
        quantize_module,
        "calibrate",
        lambda src, scheme, feeds: calibrated.append(len(feeds)) or calibrate(src, scheme, feeds),
    )
    placements = _count_calls(monkeypatch, QDQQuantizer, "quantize_model")
    monkeypatch.setattr(ortq, "quantize_static", lambda *a, **k: pytest.fail("quantize_static calibrates again"))
    record = quantize_component(
        src, tmp_path / "auto.onnx", SCHEMES["int8-static"], feeds, keep="auto", budget=everything["error"] / 2
    )
    # one calibration, over every feed (quantize.calibrate: one augmented graph, ranges merged feed by feed)
    assert calibrated == [len(feeds)] and record["calibration"]["feeds"] == len(feeds)
    assert len(record["block_errors"]) > 3 and len(record["checks"]) >= 2 and record["kept_fp32"]
    # one placement: every block's error from it (BlockProbe.errors), every checked graph from it with the kept
    # blocks put back in fp32 (kept_fp32.py)
    assert len(placements) == 1 and record["final_graph"].endswith("kept blocks put back in fp32")
    # past the budget to first order, the all-quantised graph (`everything`) is not built and checked again
    assert record["checks"][0]["first_order"] > record["budget"] and "error" not in record["checks"][0]
    assert record["error"] <= everything["error"] / 2


def test_within_budget_the_sensitivity_pass_quantisation_is_the_one_checked_and_kept(unet_feeds, tmp_path, monkeypatch):
    """The whole graph the sensitivity pass quantised (no block kept) is what the check with none kept would build:
    within the budget to first order it is checked and placed, not quantised a second time."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    from edgediff.export.quantize import SCHEMES, quantize_component

    src, feeds = unet_feeds
    none = quantize_component(src, tmp_path / "none.onnx", SCHEMES["int8-static"], feeds)
    placements = _count_calls(monkeypatch, QDQQuantizer, "quantize_model")
    record = quantize_component(src, tmp_path / "auto.onnx", SCHEMES["int8-static"], feeds, keep="auto", budget=1.0)
    assert len(placements) == 1 and record["kept_fp32"] == {}
    assert record["checks"] == [
        {"kept": 0, "first_order": record["checks"][0]["first_order"], "error": record["error"]}
    ]
    assert record["error"] == pytest.approx(none["error"], abs=1e-9)
    # the same graph, its weights beside it under its own name
    assert (tmp_path / "auto.onnx.data").read_bytes() == (tmp_path / "none.onnx.data").read_bytes()
    auto = (tmp_path / "auto.onnx").read_bytes().replace(b"auto.onnx.data", b"none.onnx.data")
    assert auto == (tmp_path / "none.onnx").read_bytes()
    # nothing else left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx", "auto.onnx.data", "none.onnx", "none.onnx.data"]


# float rounding: the cut graph and a block extracted alone run the same int8 kernels on the same inputs, but
# onnxruntime may fuse a block's nodes differently in the two graphs
BLOCK_ERROR_RTOL = 1e-3


def _before_output_rounding(model, name: str) -> str:
    """The tensor a graph output `name` is before the quantiser's Quantize/DequantizeLinear pair on it (static int8
    rounds Conv and Gemm outputs), or `name` itself."""
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = producer.get(name)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else name


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic", "int4-weight-only"])
def test_block_errors_from_the_cut_graph_equal_each_block_quantised_alone(unet_feeds, tmp_path, scheme):
    """The reference: each block cut out of the fp32 graph by onnx's own extractor, quantised alone on the same
    ranges and run on the fp32 tensors recorded at its inputs. Its error at its outputs is the one the whole
    quantised graph, run cut at every block boundary, gives that block. The cut graph leaves the rounding of a
    tensor between blocks to the blocks reading it (it is their input's quantisation), so the reference's outputs
    are read before the rounding its quantiser puts on them."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgediff.export.quantize import (
        SCHEMES,
        _rel_rms,
        block_errors,
        calibrate,
        quantizable_blocks,
        quantize,
    )

    src, feeds = unet_feeds
    chosen = SCHEMES[scheme]
    structure = onnx.load(str(src), load_external_data=False)
    ranges = calibrate(src, chosen, feeds) if chosen.calibrated else None
    work = tmp_path / "work"
    work.mkdir()
    blocks = quantizable_blocks(structure, chosen)
    errors, probe = block_errors(src, structure, blocks, chosen, ranges, feeds, work, work / "all" / src.name)
    assert len(errors) > 3 and all(e > 0 for e in errors.values())
    graph_outputs = {o.name for o in structure.graph.output}
    names = list(errors)
    for name in dict.fromkeys([*names[:: max(1, len(names) // 4)], names[-1]]):  # spread over the graph, the last too
        block = probe.blocks[name]
        alone, quantised = tmp_path / f"{len(block.nodes)}.onnx", tmp_path / f"{len(block.nodes)}-q.onnx"
        onnx.utils.extract_model(str(src), str(alone), list(block.inputs), list(block.outputs), check_model=False)
        quantize(alone, quantised, chosen, [], ranges)
        model = onnx.load(str(quantised))
        outputs = probe.float_outputs(name)
        # the graph's own outputs keep their rounding in the whole quantised graph too: it is what the graph returns
        fetched = [t if t in graph_outputs else _before_output_rounding(model, t) for t in outputs]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in fetched if t not in outputs)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got, ref = [], []
        for k in range(len(feeds)):
            got += session.run(fetched, {t: np.asarray(probe.value(t, k)) for t in block.inputs})
            ref += [np.asarray(probe.value(t, k)) for t in outputs]
        assert errors[name] == pytest.approx(_rel_rms(got, ref), rel=BLOCK_ERROR_RTOL), name
    probe.close()


def test_block_errors_run_in_groups_on_pruned_graphs_give_the_same_errors(unet_feeds, tmp_path, monkeypatch):
    """Past MAX_FETCH_BYTES of outputs in one run, blocks run in groups, each on the cut graph pruned to what its
    outputs need: here every block alone (a limit of one byte), the errors and deltas those of the single run. The
    cut graph of every block opens on a thread of its own (BlockProbe.open_ahead), beside the recording, where
    the outputs' inferred least sizes make one group: used where the recorded sizes make one too, else dropped and
    each group opened (here with inference giving no shapes); not opened where the inferred sizes make groups; and
    opened again where it failed to open there. No session outlives the ranking's need of it."""
    import gc
    import threading
    import weakref

    import numpy as np
    import onnx

    from edgediff.export import blocks as blocks_module
    from edgediff.export.quantize import SCHEMES, block_errors, calibrate, quantizable_blocks

    src, feeds = unet_feeds
    chosen = SCHEMES["int8-static"]
    ranges = calibrate(src, chosen, feeds)
    found, opened, sessions, ahead_sessions = {}, [], [], []
    real_open, real_shapes = blocks_module.BlockProbe._open_pruned, blocks_module._shapes
    failing = threading.Event()

    def open_pruned(probe, model, fetched, quantised):
        on_thread = threading.current_thread().name.startswith("edgediff-cut")
        opened.append((on_thread, len(fetched)))
        if on_thread and failing.is_set():
            raise MemoryError("the whole cut graph does not fit")
        if not on_thread:  # the session opened ahead is let go before a group's opens beside it
            gc.collect()
            assert not any(alive() for alive in ahead_sessions)
        session = real_open(probe, model, fetched, quantised)
        (ahead_sessions if on_thread else sessions).append(weakref.ref(session))
        return session

    monkeypatch.setattr(blocks_module.BlockProbe, "_open_pruned", open_pruned)
    cases = {"one": (blocks_module.MAX_FETCH_BYTES, True, False), "groups": (1, True, False)}
    cases |= {"unforeseen": (1, False, False), "failed": (blocks_module.MAX_FETCH_BYTES, True, True)}
    for case, (limit, inferred, fails) in cases.items():
        monkeypatch.setattr(blocks_module, "MAX_FETCH_BYTES", limit)
        monkeypatch.setattr(blocks_module, "_shapes", real_shapes if inferred else lambda *a: {})
        failing.set() if fails else failing.clear()
        opened.clear()
        work = tmp_path / case
        work.mkdir()
        structure = onnx.load(str(src), load_external_data=False)  # block_errors moves its weights out
        blocks = quantizable_blocks(structure, chosen)
        errors, probe = block_errors(src, structure, blocks, chosen, ranges, feeds, work, work / "all" / src.name)
        groups = blocks_module._fetch_groups(
            {b: probe.float_outputs(b) for b in probe.blocks}, lambda t: probe.value(t, 0).nbytes
        )
        deltas = {t: np.load(probe._delta_path(t, 0)) for b in probe.blocks for t in probe.float_outputs(b)}
        found[case] = (errors, len(groups), deltas, list(opened))
        probe.close()
        gc.collect()
        assert not any(alive() for alive in sessions + ahead_sessions), case  # none kept (a future's result, say)
    (whole, one_run, whole_deltas, ahead), (alone, runs, alone_deltas, each) = found["one"], found["groups"]
    assert one_run == 1 and runs == len(alone) > 3
    every_output = ahead[0][1]
    assert ahead == [(True, every_output)]  # one session, opened beside the recording, used
    assert len(each) == runs and not any(on_thread for on_thread, _ in each)  # groups foreseen: none opened ahead
    assert found["unforeseen"][3] == [(True, every_output), *each]  # opened ahead, dropped, each group opened
    assert found["failed"][3] == [(True, every_output), (False, every_output)]  # failed there, opened here
    assert alone == pytest.approx(whole, rel=1e-6)
    assert found["unforeseen"][0] == pytest.approx(alone, rel=1e-6) and found["failed"][0] == pytest.approx(whole)
    assert all(np.allclose(alone_deltas[t], whole_deltas[t], atol=1e-6) for t in whole_deltas)


def test_block_errors_rank_a_damaged_block_first_and_it_is_kept(unet_feeds, tmp_path):
    """An outlier feature static int8 cannot survive: one feature into an attention block's feed-forward output
    projection made ~1000x the others (its gate's bias) while that projection ignores it (zero weights). The
    fp32 graph hardly notices, but the feature stretches the per-tensor activation range until the others
    round to zero: the block's error is the worst, and it is the first block kept."""
    import onnx
    from onnx import numpy_helper

    from edgediff.export.quantize import SCHEMES, block_of, quantize_component

    src, feeds = unet_feeds
    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    project = next(n for n in model.graph.node if n.name.endswith("ff/net.2/MatMul"))
    gate = next(
        n
        for n in model.graph.node
        if n.name.endswith("ff/net.0/proj/Add") and block_of(n.name) == block_of(project.name)
    )
    damaged = block_of(project.name)

    def edit(name, change):
        array = numpy_helper.to_array(weights[name]).copy()
        change(array)
        weights[name].CopyFrom(numpy_helper.from_array(array, name))

    hidden = numpy_helper.to_array(weights[project.input[1]]).shape[0]

    def outlier(bias):
        bias[0] += 30.0  # the feature's value
        bias[hidden] = 1000.0  # its gate, wide open

    edit(next(i for i in gate.input if i in weights), outlier)

    def ignored(w):
        w[0] = 0.0
        w *= 4.0  # and what the projection adds to the block's output weighs more

    edit(project.input[1], ignored)
    onnx.save(model, str(tmp_path / "damaged.onnx"))
    none = quantize_component(tmp_path / "damaged.onnx", tmp_path / "none.onnx", SCHEMES["int8-static"], feeds)
    record = quantize_component(
        tmp_path / "damaged.onnx",
        tmp_path / "auto.onnx",
        SCHEMES["int8-static"],
        feeds,
        keep="auto",
        budget=none["error"] / 4,
    )
    errors = list(record["block_errors"].values())
    assert next(iter(record["block_errors"])) == damaged and errors[0] > 2 * errors[1], record["block_errors"]
    assert next(iter(record["kept_fp32"])) == damaged
    assert next(iter(record["sensitivity"]["output_errors"])) == damaged
    assert record["error"] <= none["error"] / 4


def _synthetic(
    powers: dict[str, float],
    real_over_predicted: float,
    all_quantised_over_predicted: float = 1.0,
    cancel: tuple[str, ...] = (),
    by: float = 0.0,
):
    """power(group) adds the blocks' powers, less `by` where every block of `cancel` is in the group (their errors
    cancel in part); check(kept) is the real error, `real_over_predicted` times that power of what is left once
    blocks are kept (blocks interact more than the sum says), and `all_quantised_over_predicted` times it with none
    kept."""
    calls = {"power": 0, "check": []}

    def power_of(group) -> float:
        return sum(powers[b] for b in group) - (by if cancel and set(cancel) <= set(group) else 0.0)

    def power(group):
        calls["power"] += 1
        return power_of(group)

    def check(kept):
        calls["check"].append(list(kept))
        rest = max(power_of([b for b in powers if b not in kept]), 0.0)
        return math.sqrt(rest * (real_over_predicted if kept else all_quantised_over_predicted))

    return power, check, calls


def test_a_failed_whole_graph_check_keeps_more_blocks():
    from edgediff.export.quantize import keep_until_within

    powers = {"a": 1e-4, "b": 9e-4, "c": 1e-5, "d": 4e-4, "e": 1e-6, "f": 2e-5}
    power, check, calls = _synthetic(powers, real_over_predicted=4.0)
    kept, error, checks, why, alone = keep_until_within(list(powers), power, check, budget=0.02)
    # past the budget to first order, the all-quantised graph is not checked; predicted within budget with b and
    # d kept, the check says otherwise, so a is kept too
    assert calls["check"] == [["b", "d"], ["b", "d", "a"]]
    assert checks[0] == {"kept": 0, "first_order": round(math.sqrt(sum(powers.values())), 6)}
    assert checks[1]["predicted"] <= 0.02 < checks[1]["error"]
    assert kept == ["b", "d", "a"] and error <= 0.02 and checks[-1]["error"] == round(error, 6)
    assert set(why) == set(kept) and set(alone) == set(kept)
    assert "to first order" in why["b"] and "to first order" not in why["a"]
    assert alone["b"] == pytest.approx(math.sqrt(9e-4), rel=1e-4)
    assert calls["power"] <= len(powers)  # halving finds the costly blocks without a run per block


def test_within_budget_to_first_order_the_whole_graph_is_checked_and_kept_as_it_is():
    from edgediff.export.quantize import keep_until_within

    power, check, calls = _synthetic({"a": 1e-5, "b": 2e-5}, real_over_predicted=1.0)
    kept, error, checks, why, alone = keep_until_within(["a", "b"], power, check, budget=0.02)
    assert kept == [] and calls["power"] == 1 and calls["check"] == [[]] and why == alone == {}
    assert checks == [{"kept": 0, "first_order": round(math.sqrt(3e-5), 6), "error": round(error, 6)}]


def test_a_first_order_below_the_budget_that_the_check_refutes_keeps_blocks():
    """The first order may underestimate the all-quantised graph's error: its check then scales the prediction,
    as any failed check does."""
    from edgediff.export.quantize import keep_until_within

    powers = {"a": 1e-4, "b": 2e-4}  # first order 0.017
    power, check, calls = _synthetic(powers, real_over_predicted=1.0, all_quantised_over_predicted=4.0)
    kept, error, checks, why, alone = keep_until_within(list(powers), power, check, budget=0.02)
    assert calls["check"][0] == [] and checks[0]["error"] > 0.02 >= checks[0]["first_order"]
    assert kept[0] == "b" and error <= 0.02


def test_past_the_run_limit_a_groups_error_is_shared_by_block_errors():
    """Out of whole-graph runs, a measured group's power is shared among its blocks by their block-local
    errors, and the largest shares are kept."""
    from edgediff.export.quantize import keep_until_within

    powers = {f"x{i}": 1e-4 for i in range(4)} | {"y": 8e-4, "z": 1e-5}
    prior = {b: 0.01 for b in powers} | {"y": 0.05}
    power, check, calls = _synthetic(powers, real_over_predicted=1.0)
    kept, error, checks, why, alone = keep_until_within(list(powers), power, check, 0.02, prior=prior, max_runs=1)
    assert calls["power"] == 1 and kept[0] == "y" and error <= 0.02 and alone == {}
    assert why["y"].startswith("about") and "(estimated)" in why["y"]


@pytest.mark.parametrize("max_runs", [12, 3])
def test_a_half_costing_more_than_its_group_does_not_hide_the_other_half(max_runs):
    """b and c cancel in part: b alone costs more than b and c together, and their difference would say c costs
    nothing. c is measured where runs are left, else given the group's power by the blocks' own errors; either way
    it is kept before a, which costs little."""
    from edgediff.export.quantize import keep_until_within

    powers = {"a": 1e-5, "b": 9e-4, "c": 8e-4}  # b and c together: 6e-4
    power, check, calls = _synthetic(powers, real_over_predicted=1.0, cancel=("b", "c"), by=1.1e-3)
    prior = {"a": 0.003, "b": 0.03, "c": 0.03}
    kept, error, checks, why, alone = keep_until_within(
        list(powers), power, check, 0.02, prior=prior, max_runs=max_runs
    )
    assert kept == ["b", "c"] and error <= 0.02, (kept, checks)
    assert calls["power"] <= max_runs
    if max_runs > 3:
        assert alone["c"] == pytest.approx(math.sqrt(8e-4), rel=1e-4)
    else:  # out of runs once b is measured: half the group's 6e-4 (b and c's own errors being equal), scaled by
        # the check with b kept (a's 1e-5 and c's share left)
        scale = checks[1]["error"] ** 2 / (3e-4 + 1e-5)
        assert checks[1]["kept"] == 1 and why["c"].startswith(f"about {math.sqrt(scale * 3e-4):.4f}")


def test_explicit_blocks_stay_fp32(unet_feeds, tmp_path):
    """keep=[names]: those blocks' nodes read no dequantised tensors; the rest is quantised as with keep="none"."""
    import onnx

    from edgediff.export.quantize import SCHEMES, block_of, quantizable_blocks, quantize_component

    src, feeds = unet_feeds
    block = next(iter(quantizable_blocks(onnx.load(str(src)), SCHEMES["int8-static"])))
    record = quantize_component(src, tmp_path / "kept.onnx", SCHEMES["int8-static"], feeds, keep=[block])
    assert record["kept_fp32"] == {block: "asked"} and record["error"] > 0
    graph = onnx.load(str(tmp_path / "kept.onnx")).graph
    dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    ops = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert all(not set(n.input) & dequantised for n in ops if block_of(n.name) == block)
    assert any(set(n.input) & dequantised for n in ops if block_of(n.name) != block)


def test_graphs_with_external_data_quantise_the_same(unet_feeds, tmp_path, monkeypatch):
    """Graphs past 2 GB (full-size UNets) keep their weights beside them: the structure alone is loaded for
    the blocks, each block's weights read from the data file, the quantised graph written with external data
    and moved into the bundle as it is. Forced here on the tiny UNet."""
    import onnx

    from edgediff.export import bundle_quantize, quantize

    src, feeds = unet_feeds
    inline = quantize.quantize_component(
        src, tmp_path / "inline.onnx", quantize.SCHEMES["int8-static"], feeds, keep="auto", budget=0.01
    )
    big = tmp_path / "big"
    big.mkdir()
    onnx.save(onnx.load(str(src)), str(big / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data")
    monkeypatch.setattr(quantize, "LARGE_GRAPH_BYTES", 0)
    out = tmp_path / "out"
    out.mkdir()
    record = quantize.quantize_component(
        big / "unet.onnx", out / "unet.onnx", quantize.SCHEMES["int8-static"], feeds, keep="auto", budget=0.01
    )
    assert record["block_errors"] == pytest.approx(inline["block_errors"], abs=1e-6)
    assert record["kept_fp32"].keys() == inline["kept_fp32"].keys()
    assert record["error"] == pytest.approx(inline["error"], abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert sorted(p.name for p in big.iterdir()) == ["unet.onnx", "unet.onnx.data"]  # no probe left beside it
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    files = bundle_quantize.place_quantized(out / "unet.onnx", bundle, "unet")
    assert list(files) == ["unet.onnx", "unet.onnx.data"] == sorted(p.name for p in bundle.iterdir())
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle / "unet.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, feeds[0])[0]).all()  # its weights found beside it


def test_the_recording_session_is_the_injection_session_and_an_untyped_graph_gives_the_same(
    unet_feeds, tmp_path, monkeypatch
):
    """Where shape inference types every block output, the fp32 graph opens once: its injection session records the
    boundaries and the graph's output, then ranks; where it cannot (onnxruntime's own operators), a recording
    session of its own gives the dtypes first. Both give the same block errors and output errors."""
    import onnx

    from edgediff.export import blocks as blocks_module
    from edgediff.export.quantize import SCHEMES, block_errors, calibrate, quantizable_blocks

    src, feeds = unet_feeds
    chosen = SCHEMES["int8-static"]
    ranges = calibrate(src, chosen, feeds)
    found = {}
    real_open, opened = blocks_module.BlockProbe._open, []
    monkeypatch.setattr(
        blocks_module.BlockProbe, "_open", lambda self, model, tag: opened.append(tag) or real_open(self, model, tag)
    )
    for typed in (True, False):
        if not typed:
            monkeypatch.setattr(blocks_module, "_types", lambda model, names: None)
        opened.clear()
        work = tmp_path / str(typed)
        work.mkdir()
        structure = onnx.load(str(src), load_external_data=False)
        blocks = quantizable_blocks(structure, chosen)
        errors, probe = block_errors(src, structure, blocks, chosen, ranges, feeds, work, work / "all" / src.name)
        names = list(errors)
        powers = [probe.output_power(names), probe.output_power(names[: len(names) // 2])]
        probe.close()
        found[typed] = errors, powers, list(opened)
    (errors, powers, opened), (errors_untyped, powers_untyped, opened_untyped) = found.values()
    assert opened == ["injection"] and opened_untyped == ["probe", "injection"]
    assert errors_untyped == pytest.approx(errors, rel=1e-6)
    assert powers_untyped == pytest.approx(powers, rel=1e-6) and powers[0] > powers[1] > 0


def test_the_final_graph_is_checksummed_where_it_is_checked(unet_feeds, tmp_path, monkeypatch):
    """Given the bundle's checksums, the final graph's files are read once, where the graph is checked (their reading
    starts with its check), and the checksums stand once it is moved into place (quantize_component's
    `checksums`)."""
    import hashlib
    from types import SimpleNamespace

    from edgediff.export import checksums
    from edgediff.export.quantize import SCHEMES, quantize_component

    src, feeds = unet_feeds
    reads, real = [], checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path: reads.append(path) or real(path))
    with checksums.BackgroundChecksums(tmp_path) as background:
        quantize_component(
            src, tmp_path / "auto.onnx", SCHEMES["int8-static"], feeds, keep="auto", checksums=background
        )
        files = {"auto.onnx": {}, "auto.onnx.data": {}}
        background.fill(SimpleNamespace(components={"unet": SimpleNamespace(files=files)}))
    for name, record in files.items():
        assert record["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest(), name
    assert sorted(p.name for p in reads) == ["auto.onnx", "auto.onnx.data"]
    assert all(p.parent.name.startswith("edgediff-quant-") for p in reads), reads  # before the move


@pytest.mark.parametrize("share", [1.0, 0.25])
def test_groups_whose_errors_reach_the_graphs_tail_alone_run_it_for_the_same_output_error(
    unet_feeds, tmp_path, monkeypatch, share
):
    """A group of blocks whose errors reach only the graph's last nodes is measured on that tail, fed the recorded
    fp32 tensors at its edge: the same output error as the whole graph gives (TAIL_RTOL: the tail's operators fused
    differently at its edge), for each block alone and for groups. The whole graph runs for groups that reach the
    first nodes, and where a tail would hold more than TAIL_MAX_WEIGHT_SHARE of the weights; the tails held at once
    stay within that share."""
    import onnx

    from edgediff.export import blocks as blocks_module
    from edgediff.export.quantize import SCHEMES, block_errors, calibrate, quantizable_blocks

    src, feeds = unet_feeds
    chosen = SCHEMES["int8-static"]
    structure = onnx.load(str(src), load_external_data=False)
    blocks = quantizable_blocks(structure, chosen)
    ranges = calibrate(src, chosen, feeds)
    _, probe = block_errors(src, structure, blocks, chosen, ranges, feeds, tmp_path, tmp_path / "all" / src.name)
    names = list(blocks)
    groups = [[b] for b in names] + [names[len(names) // 2 :], names[-3:], names[1:4], names]
    monkeypatch.setattr(blocks_module, "TAIL_MAX_WEIGHT_SHARE", 0.0)
    whole = [probe.output_power(g) for g in groups]
    assert not probe._tails
    monkeypatch.setattr(blocks_module, "TAIL_MAX_WEIGHT_SHARE", share)
    tails_of = []
    real_tail = blocks_module.BlockProbe._tail
    monkeypatch.setattr(
        blocks_module.BlockProbe, "_tail", lambda self, g: tails_of.append(real_tail(self, g)) or tails_of[-1]
    )
    tailed = [probe.output_power(g) for g in groups]
    assert tailed == pytest.approx(whole, rel=TAIL_RTOL) and min(whole) > 0
    walk = probe._walk
    used = [t for t in tails_of if t is not None]
    assert used and all(t.weight_bytes <= share * walk.weight_bytes for t in used)
    last = tails_of[groups.index([names[-1]])]  # the last block's tail: a few of the graph's weights
    assert last is not None and last.weight_bytes < walk.weight_bytes / 4
    if share < 1.0:  # every block's errors reach (nearly) every weight: the whole graph runs
        assert tails_of[groups.index(names)] is None
    assert sum(t.weight_bytes for t in probe._tails.values()) <= share * walk.weight_bytes
    probe.close()
    assert not probe._tails


TAIL_RTOL = 1e-4  # relative: output powers of the tail against the whole graph (float sums in another order)


def test_after_a_cancelling_pair_is_kept_a_failed_check_still_scales_the_prediction():
    """b and c cancel in part, so once both are kept the blocks kept weigh more than the whole graph's first order.
    The prediction comes from the powers of the blocks left: a failed check scales it, and the next check keeps
    every block it needs at once, rather than one whole-graph check per block kept."""
    from edgediff.export.quantize import keep_until_within

    powers = {"x1": 1e-4, "x2": 1e-4, "b": 9e-4, "c": 8e-4, "x3": 1e-4, "x4": 1e-4}  # b and c together: 6e-4
    power, check, calls = _synthetic(powers, real_over_predicted=4.0, cancel=("b", "c"), by=1.1e-3)
    kept, error, checks, why, alone = keep_until_within(list(powers), power, check, 0.02)
    assert {"b", "c"} <= set(kept) and error <= 0.02, (kept, checks)
    assert len(calls["check"]) == 2, calls["check"]  # with b and c kept, then with the three more it takes
