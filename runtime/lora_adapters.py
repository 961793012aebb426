"""Run-time LoRAs: adapter files converted for a bundle exported with `--lora-slots`, mixed per call.

A bundle's LoRA slots (export/lora_slots.py) are graph inputs with empty defaults: `lora.<module>.down` and
`lora.<module>.up`, Linear `(in, rank)` and `(rank, out)`, Conv `(rank, in, kh, kw)` and `(out, rank, 1, 1)`.
`edgediff lora convert` writes one adapter file per LoRA into `<bundle>/loras/` (onnxruntime's AdapterFormat,
keys `<component>:<input>`, the LoRA's alpha / rank folded into `up`). A call's mix of LoRAs becomes one
onnxruntime adapter per graph: the LoRAs side by side along the rank axis, each one's weight folded into its
`up`, given to each run through `RunOptions.add_active_adapter`. A mix is built once and kept (MAX_MIXES), so
switching between calls costs milliseconds and never reopens a graph; no LoRA means no adapter, so the graphs run
exactly as a plain bundle's.

Why adapters, not initializer overrides (`SessionOptions.add_initializer`): overrides are fixed when a session is
created, so each switch re-creates and re-optimises the UNet's session: 170-340 ms on the shipped model's UNet
against 6-13 ms to build and load an adapter mix, at the same time per UNet call within noise (docs/loras.md,
"How it works, and how fast"). Each mix is written to a temporary file, because onnxruntime loads adapters
only from files, which it memory-maps.
"""

from __future__ import annotations

import contextvars
import logging
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError, InputError

log = logging.getLogger("edgediff.lora")

LORA_FOLDER = "loras"  # inside the bundle: `edgediff lora convert` writes there, the runtime finds names there
ADAPTER_SUFFIX = ".onnx_adapter"
KEY_SEPARATOR = ":"  # adapter file keys: "<component>:<graph input>"
# (down's rank axis, up's rank axis) per layer kind: where LoRAs of a mix sit side by side
RANK_AXES = {"linear": (1, 0), "conv": (0, 1)}
MAX_MIXES = 4  # mixes kept built: switching back and forth between a few costs nothing
MAX_NAMED = 5  # mismatched layers named in an error; the rest are counted


def slot_input_names(module: str) -> tuple[str, str]:
    """The graph inputs of one layer's slot: (down, up)."""
    return f"lora.{module}.down", f"lora.{module}.up"


def slot_shapes(slot: dict, rank: int) -> tuple[tuple, tuple]:
    """The (down, up) shapes of a slot at `rank`."""
    if slot["kind"] == "linear":
        return (slot["in"], rank), (rank, slot["out"])
    return (rank, slot["in"], *slot["kernel"]), (slot["out"], rank, 1, 1)


def mismatched_layers(slots: dict[str, dict], layers: dict[tuple[str, str], tuple[tuple, tuple]]) -> list[str]:
    """The layers of a LoRA that the bundle's slots do not take: no slot there, or other widths.
    `slots`: component -> its manifest record; `layers`: (component, module) -> (down shape, up shape)."""
    bad = []
    for (component, module), (down, up) in layers.items():
        slot = slots.get(component, {}).get("slots", {}).get(module)
        if slot is None:
            bad.append(f"{component}.{module} (no slot)")
            continue
        down_axis, up_axis = RANK_AXES[slot["kind"]]
        rank = down[down_axis] if len(down) > down_axis else -1
        if (tuple(down), tuple(up)) != tuple(tuple(s) for s in slot_shapes(slot, rank)):
            bad.append(f"{component}.{module} ({_shape(down)} x {_shape(up)}, the bundle's is {_slot_text(slot)})")
    return bad


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _slot_text(slot: dict) -> str:
    kernel = f" kernel {_shape(slot['kernel'])}" if slot["kind"] == "conv" else ""
    return f"{slot['kind']} {slot['in']} -> {slot['out']}{kernel}"


def mismatch_error(name: str, where, bad: list[str]) -> InputError:
    named = ", ".join(bad[:MAX_NAMED]) + (f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else "")
    return InputError("lora_mismatch", name=name, path=where, count=len(bad), layers=named)


def parse_lora_weight(spec: str) -> tuple[str, float]:
    """ "NAME[:WEIGHT]" -> (name, weight); the weight defaults to 1."""
    name, sep, weight = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise InputError("lora_weight", name=name, value=weight) from None


def read_adapter(file: Path) -> dict[str, np.ndarray]:
    """An adapter file's arrays, copied: the values onnxruntime hands out point into the reader's own buffer, which
    goes with it (reading them later gave garbage)."""
    reader = ort.AdapterFormat.read_adapter(str(file))
    arrays = {key: np.array(value.numpy(), copy=True) for key, value in reader.get_parameters().items()}
    del reader
    return arrays


# the adapters of the call running in this thread (or asyncio task): graph name -> adapter
_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("edgediff_lora_adapters", default=None)


@contextmanager
def active(adapters: dict[str, ort.LoraAdapter] | None):
    """Within the block, runs of these graphs in this thread get their adapter (GraphSession.run asks)."""
    token = _ACTIVE.set(adapters or None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def has_active(component: str) -> bool:
    """Whether the current call has an adapter for `component`."""
    adapters = _ACTIVE.get()
    return bool(adapters) and adapters.get(component) is not None


def run_options_for(component: str, run_options: ort.RunOptions | None) -> ort.RunOptions | None:
    """`run_options` with the active adapter for `component` added, if the current call has one."""
    adapters = _ACTIVE.get()
    adapter = adapters.get(component) if adapters else None
    if adapter is None:
        return run_options
    options = run_options or ort.RunOptions()
    options.add_active_adapter(adapter)
    return options


class RuntimeLoras:
    """The run-time LoRAs of one bundle: what `loras=` can name, and each mix's adapters, built once."""

    def __init__(self, bundle):
        self.path = Path(bundle.path)
        self.folder = self.path / LORA_FOLDER
        self.slots = {
            name: spec.attributes["lora_slots"]
            for name, spec in bundle.manifest.components.items()
            if spec.attributes.get("lora_slots", {}).get("slots")
        }
        self._arrays: dict[str, dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]] = {}
        self._mixes: OrderedDict[tuple, dict[str, ort.LoraAdapter]] = OrderedDict()
        self._files: dict[tuple, list[Path]] = {}  # each kept mix's adapter files
        self._workdir: Path | None = None
        self._built = 0
        self._lock = threading.Lock()

    def known(self) -> list[str]:
        """The LoRA names this bundle has adapters for."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name[: -len(ADAPTER_SUFFIX)] for p in self.folder.glob(f"*{ADAPTER_SUFFIX}"))

    def adapters(self, loras: dict | None) -> dict[str, ort.LoraAdapter] | None:
        """Each graph's adapter for `loras` ({name: weight}); None for no LoRA (weights of 0 count as none)."""
        if not loras:
            return None
        if not isinstance(loras, dict):
            raise InputError("lora_argument", value=loras)
        mix = []
        for name, weight in loras.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)):
                raise InputError("lora_weight", name=name, value=weight)
            if not np.isfinite(weight):
                raise InputError("lora_weight", name=name, value=weight)
            mix.append((str(name), float(weight)))
        if not self.slots:
            raise InputError("lora_no_slots", path=self.path)
        known = self.known()
        for name, _ in mix:
            if name not in known:
                raise InputError("lora_unknown", name=name, path=self.path, known=", ".join(known) or "none")
        key = tuple(sorted((n, w) for n, w in mix if w != 0.0))
        if not key:
            return None
        with self._lock:
            if key in self._mixes:
                self._mixes.move_to_end(key)
                return self._mixes[key]
            built, self._files[key] = self._build(key)
            self._mixes[key] = built
            while len(self._mixes) > MAX_MIXES:
                evicted, _ = self._mixes.popitem(last=False)  # its adapters go once no call in flight holds them
                self._remove_files(self._files.pop(evicted))
            return built

    def _layers(self, name: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
        """One LoRA's (down, up) per (component, module), read once and checked against the slots."""
        if name in self._arrays:
            return self._arrays[name]
        file = self.folder / f"{name}{ADAPTER_SUFFIX}"
        if not file.resolve().is_relative_to(self.path.resolve()):  # a bundle is data: nothing outside it is read
            raise BundleError("file_outside", path=self.path, file=f"{LORA_FOLDER}/{file.name}")
        try:
            params = read_adapter(file)
        except Exception as exc:  # onnxruntime raises its own types for a file that is not an adapter
            raise InputError("lora_unreadable", path=file, detail=str(exc).splitlines()[0]) from None
        halves: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for key, value in params.items():
            component, _, graph_input = key.partition(KEY_SEPARATOR)
            module, _, half = graph_input.removeprefix("lora.").rpartition(".")
            if not graph_input.startswith("lora.") or half not in ("down", "up"):
                raise InputError("lora_unreadable", path=file, detail=f"unexpected entry {key!r}")
            halves.setdefault((component, module), {})[half] = value
        layers = {}
        for where, pair in halves.items():
            if set(pair) != {"down", "up"}:
                raise InputError("lora_unreadable", path=file, detail=f"{where[1]} lacks its down or up weights")
            layers[where] = (pair["down"], pair["up"])
        bad = mismatched_layers(self.slots, {k: (d.shape, u.shape) for k, (d, u) in layers.items()})
        if bad:
            raise mismatch_error(name, self.path, bad)
        self._arrays[name] = layers
        return layers

    def _build(self, mix: tuple) -> tuple[dict[str, ort.LoraAdapter], list[Path]]:
        """The mix's adapter per graph (each touched slot's LoRAs side by side, weights folded into `up`), and
        their files."""
        parts: dict[str, dict[str, tuple[list, list]]] = {}
        for name, weight in mix:
            for (component, module), (down, up) in self._layers(name).items():
                downs, ups = parts.setdefault(component, {}).setdefault(module, ([], []))
                downs.append(down)
                ups.append((up * weight).astype(up.dtype))
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="edgediff-loras-"))
            # a pipeline never closed still leaves no files: the folder goes when this object does, or at exit
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._workdir, True)
        adapters, files = {}, []
        for component, modules in parts.items():
            values = {}
            for module, (downs, ups) in modules.items():
                down_axis, up_axis = RANK_AXES[self.slots[component]["slots"][module]["kind"]]
                down_name, up_name = slot_input_names(module)
                values[down_name] = ort.OrtValue.ortvalue_from_numpy(np.concatenate(downs, axis=down_axis))
                values[up_name] = ort.OrtValue.ortvalue_from_numpy(np.concatenate(ups, axis=up_axis))
            fmt = ort.AdapterFormat()
            fmt.set_parameters(values)
            self._built += 1
            file = self._workdir / f"mix-{self._built}-{component}{ADAPTER_SUFFIX}"
            fmt.export_adapter(str(file))
            adapter = ort.LoraAdapter()
            adapter.Load(str(file))  # memory-mapped
            adapters[component], files = adapter, [*files, file]
        log.info("LoRA mix %s built for %s", ", ".join(f"{n}:{w:g}" for n, w in mix), ", ".join(adapters))
        return adapters, files

    @staticmethod
    def _remove_files(files: list[Path]) -> None:
        """Deletes an evicted mix's files: a mapping in use keeps its pages (POSIX); Windows refuses, and the file
        then goes with the folder at close()."""
        for file in files:
            try:
                file.unlink()
            except OSError as exc:
                log.debug("LoRA mix file %s stays until close: %s", file, exc)

    def close(self) -> None:
        with self._lock:
            self._mixes.clear()
            self._files.clear()
            self._arrays.clear()
            if self._workdir is not None:
                self._cleanup()  # rmtree, errors ignored: a mapped file may outlive us on Windows
                self._workdir = None
