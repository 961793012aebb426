"""The API an app embeds: step callbacks and previews, cancel from another thread, concurrent calls,
close(), low-memory mode, and memory that stays flat over many images. On the shipped model."""

import gc
import threading

import numpy as np
import pytest

from edgediff.models.shipped import default_bundle
from edgediff.runtime import Cancelled, CancelToken, Pipeline, PipelineClosed, StepEvent

PROMPT = "a large red circle on a blue background"
# Resident memory may grow this much between image 20 and image 200 of one process (allocator noise;
# measured 0.7 MiB). Keeping one call's decoded image, PIL image and latents (~64 KiB) alive per call
# would add ~11 MiB over the 180 images.
RSS_GROWTH_BOUND_MIB = 8
LOW_MEMORY_MAX_LEVELS = 1  # low-memory mode vs default, per 8-bit channel value (different GEMM rounding)
MEMORY_IMAGES, MEMORY_WARMUP = 200, 20


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.from_bundle(default_bundle(), provider="cpu") as p:
        yield p


def test_callback_sees_every_step_in_order_with_previews(pipe):
    events: list[StepEvent] = []
    out = pipe(PROMPT, seed=0, num_inference_steps=4, callback=events.append, preview=True)
    assert [(e.step, e.total) for e in events] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert all(len(e.preview) == 1 and e.preview[0].size == out.images[0].size for e in events)
    assert [e.timestep for e in events] == sorted((e.timestep for e in events), reverse=True)
    # without preview=True nothing is decoded per step
    quiet: list[StepEvent] = []
    pipe(PROMPT, seed=0, num_inference_steps=2, callback=quiet.append)
    assert [e.preview for e in quiet] == [None, None]


def test_cancel_raises_and_the_next_call_works(pipe):
    token = CancelToken()

    def cancel_after_second(event):
        if event.step == 1:
            token.cancel()

    with pytest.raises(Cancelled) as info:
        pipe(PROMPT, seed=0, num_inference_steps=4, callback=cancel_after_second, cancel=token)
    assert info.value.fields["step"] == 2  # stopped before the third denoiser call
    reference = np.asarray(pipe(PROMPT, seed=0, num_inference_steps=4).images[0])
    token.reset()
    again = np.asarray(pipe(PROMPT, seed=0, num_inference_steps=4, cancel=token).images[0])
    np.testing.assert_array_equal(again, reference)


def test_cancel_from_another_thread_aborts_the_denoiser_call_in_flight():
    """The cancel lands while onnxruntime is inside the first UNet call: that call is aborted
    (RunOptions.terminate), so the error names step 0, not the next step's check."""
    with Pipeline.from_bundle(default_bundle(), provider="cpu", threads=1) as p:
        unet = p.sessions.get("unet")
        started = threading.Event()
        real_run = unet.run

        def run_and_signal(run_options=None, **feeds):
            started.set()
            return real_run(run_options, **feeds)

        unet.run = run_and_signal
        token = CancelToken()
        canceller = threading.Thread(target=lambda: started.wait(30) and token.cancel())
        canceller.start()
        with pytest.raises(Cancelled) as info:
            # 512x512 on a 64x64 model: each UNet call is long enough for the cancel to land inside it
            p(PROMPT, seed=0, num_inference_steps=4, height=512, width=512, cancel=token, output_type="latent")
        canceller.join()
        assert info.value.fields["step"] == 0


def test_four_threads_give_the_same_images_as_one(pipe):
    seeds = [3, 4, 5, 6]
    alone = {s: np.asarray(pipe(PROMPT, seed=s).images[0]) for s in seeds}
    together, errors = {}, []

    def work(s):
        try:
            together[s] = np.asarray(pipe(PROMPT, seed=s).images[0])
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in seeds:
        np.testing.assert_array_equal(together[s], alone[s])


def test_close_releases_sessions_and_refuses_further_calls():
    with Pipeline.from_bundle(default_bundle(), provider="cpu") as p:
        p(PROMPT, seed=0, num_inference_steps=1)
        assert p.sessions.loaded
    assert p.sessions.loaded == []
    with pytest.raises(PipelineClosed):
        p(PROMPT, seed=0)


def test_low_memory_mode_gives_the_same_image_with_one_graph_loaded(pipe):
    reference = np.asarray(pipe(PROMPT, seed=1).images[0])
    loaded = []
    with Pipeline.from_bundle(default_bundle(), provider="cpu", low_memory=True) as low:
        assert low.sessions.loaded == []  # nothing opened until needed
        image = low(PROMPT, seed=1, callback=lambda e: loaded.append(list(low.sessions.loaded))).images[0]
        assert low.sessions.loaded == ["vae_decoder"]
    assert all(names == ["unet"] for names in loaded)
    # low-memory sessions skip weight prepacking, whose GEMM path rounds differently: at most one 8-bit level
    diff = np.abs(np.asarray(image, dtype=np.int16) - reference.astype(np.int16))
    assert diff.max() <= LOW_MEMORY_MAX_LEVELS and (diff > 0).mean() < 0.01


def test_low_memory_mode_holds_glibcs_mmap_threshold(monkeypatch):
    """Low-memory mode asks glibc to map every large buffer on its own, so that a closed graph's memory goes
    back to the system before the next graph's arrives (full size: 1.70 -> 1.33 GiB); the default mode leaves
    the allocator alone."""
    import platform

    from edgediff.runtime import session

    calls = []
    monkeypatch.setattr(session, "hold_mmap_threshold", lambda: calls.append(1) or True)
    Pipeline.from_bundle(default_bundle(), provider="cpu").close()
    assert calls == []
    Pipeline.from_bundle(default_bundle(), provider="cpu", low_memory=True).close()
    assert calls == [1]
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert session.hold_mmap_threshold()  # mallopt accepted the setting


def test_resident_memory_is_flat_over_many_images(pipe):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    rss = []
    for i in range(MEMORY_IMAGES):
        pipe(PROMPT, seed=i, num_inference_steps=1)
        if i + 1 == MEMORY_WARMUP:
            gc.collect()
            rss.append(proc.memory_info().rss)
    gc.collect()
    rss.append(proc.memory_info().rss)
    growth_mib = (rss[-1] - rss[0]) / 2**20
    assert growth_mib <= RSS_GROWTH_BOUND_MIB, f"resident memory grew {growth_mib:.1f} MiB over {MEMORY_IMAGES} images"
