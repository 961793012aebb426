"""What execution providers need in the process before their first session, and the one place sessions are made.

Plugin providers (onnxruntime-qnn 2) are libraries onnxruntime is given at run time and takes through a session's
devices; onnxruntime-gpu loads CUDA and cuDNN from PyPI's wheels; onnxruntime-openvino on Windows finds OpenVINO's
DLLs through its helper. Each happens once per process, from Provider.prepare (providers.py).
"""

from __future__ import annotations

import functools
import importlib
import sys

import onnxruntime as ort

from .errors import ProviderError

# plugin providers whose library this process registered: their sessions take them through devices (new_session)
_PLUGINS: set[str] = set()


@functools.lru_cache(maxsize=None)  # once per provider and process
def register_plugin(ort_name: str, module_name: str) -> None:
    module = importlib.import_module(module_name)
    try:
        ort.register_execution_provider_library(ort_name, module.get_library_path())
    except Exception as exc:  # onnxruntime's own types: a library that will not load, or one registered already
        if ort_name not in ort.get_available_providers():
            raise ProviderError("plugin_unloadable", name=ort_name, module=module_name, detail=str(exc)) from exc
    _PLUGINS.add(ort_name)


def new_session(path, opts: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    """onnxruntime's session for `providers` (the chosen one first, with its options). A plugin provider is handed
    over through the session options' devices: onnxruntime ignores one given by name (checked with onnxruntime-qnn
    2.7.0: every node then ran on the CPU), and appends its CPU provider itself."""
    name, options = providers[0]
    if name not in _PLUGINS:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:  # its library loaded, but it found nothing to run on
        raise ProviderError("plugin_no_device", name=name)
    opts.add_provider_for_devices(devices, {str(k): str(v) for k, v in options.items()})
    return ort.InferenceSession(str(path), sess_options=opts)


@functools.lru_cache(maxsize=1)  # once per process
def preload_cuda_libraries() -> None:
    # onnxruntime-gpu 1.21+ loads CUDA and cuDNN from the nvidia-* wheels its [cuda,cudnn] extras install (which
    # `edgediff[cuda]` asks for), else from the system's paths, printing what it could not find: an NVIDIA
    # driver is then all a machine needs. Older builds lack the function and use the system's CUDA. Not yet
    # checked on a GPU (the lent ones had CUDA installed)
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


@functools.lru_cache(maxsize=1)  # once per process
def openvino_windows_libraries() -> None:
    # onnxruntime-openvino's Windows wheels leave OpenVINO out: it comes from the `openvino` wheel (edgediff[openvino]
    # asks for the release that build was made with), whose DLLs onnxruntime's helper adds to the search path.
    # Not yet run on Windows
    if not sys.platform.startswith("win"):
        return
    try:
        from onnxruntime.tools import add_openvino_win_libs
    except ImportError:  # a build without the helper (not onnxruntime-openvino)
        return
    try:
        add_openvino_win_libs.add_openvino_libs_to_path()
    except SystemExit as exc:  # the helper ends the process when it finds no OpenVINO: say so instead
        raise ProviderError("openvino_libraries", detail=str(exc)) from None
