"""What low-memory mode asks of onnxruntime (measured in docs/benchmarks.md, "Low memory")."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from edgediff.models.shipped import default_bundle
from edgediff.runtime import Pipeline
from edgediff.runtime.session_config import session_options


def test_low_memory_sessions_drop_the_arena_the_memory_plan_and_prepacked_weights():
    default, low = session_options(), session_options(low_memory=True)
    assert default.enable_cpu_mem_arena and default.enable_mem_pattern
    with pytest.raises(RuntimeError):  # never set: onnxruntime prepacks
        default.get_session_config_entry("session.disable_prepacking")
    assert not low.enable_cpu_mem_arena and not low.enable_mem_pattern
    assert low.get_session_config_entry("session.disable_prepacking") == "1"


def test_float_graphs_open_without_layout_rewrites_in_low_memory_or_when_asked():
    """Graphs with float convolutions skip the NCHWc rewrite (reordered weight copies, reorder buffers); static
    int8 graphs and the default mode keep every optimisation."""
    from edgediff.runtime.graph_loader import LAYOUT_PRECISIONS

    assert LAYOUT_PRECISIONS == {"int8-static"}
    extended, everything = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with Pipeline.from_bundle(default_bundle(), provider="cpu", low_memory=True, cache=False) as low:
        low("a red circle on a blue background", seed=0, num_inference_steps=1)
        decoder = low.sessions.get("vae_decoder")
        assert decoder.keeps_layout and decoder.spec.precision == "fp32"
        assert decoder.session.get_session_options().graph_optimization_level == extended
    with Pipeline.from_bundle(default_bundle(), provider="cpu", cache=False) as default:
        decoder = default.sessions.get("vae_decoder")
        assert not decoder.keeps_layout
        assert decoder.session.get_session_options().graph_optimization_level == everything
    # asked for without low memory (RuntimeOptions.cpu_layout): the graphs are all open, without the rewrite
    with Pipeline.from_bundle(default_bundle(), provider="cpu", cpu_layout=False, cache=False) as quick:
        decoder = quick.sessions.get("vae_decoder")
        assert decoder.keeps_layout and not quick.options.low_memory
        assert decoder.session.get_session_options().graph_optimization_level == extended


def test_low_memory_graphs_have_their_own_cache_entries(tmp_path, monkeypatch):
    """A graph optimised without layout rewrites is cached apart from the default mode's, so neither mode
    loads the other's optimised form."""
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(tmp_path))
    for low_memory in (False, True):
        with Pipeline.from_bundle(default_bundle(), provider="cpu", low_memory=low_memory) as pipe:
            pipe.sessions.get("vae_decoder")
    names = sorted(p.name for p in tmp_path.rglob("vae_decoder-*.onnx"))
    assert len(names) == 2 and sum("-keeplayout" in n for n in names) == 1, names
