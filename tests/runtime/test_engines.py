"""Several engines behind the step loop's one queue (service/runtime/batching/steploop.py, lane.py),
with fake step engines, without HTTP: idle engines take new images first, a failing device fails
only its own images and is taken out of rotation while the others serve; SD_DEVICES parsing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from pydantic import ValidationError

import service.runtime.lifecycle as lifecycle_module
from model.errors import EngineFailure, ModelLoadError
from model.types import GenerationItem
from service.runtime.batching.steploop import StepLoop
from service.runtime.engines import resolve_devices
from service.runtime.errors import NotReadyError
from service.runtime.lifecycle import Lifecycle, Phase
from service.runtime.metrics import Metrics
from service.settings import Settings
from tests.runtime.fakes import item
from tests.runtime.stepfakes import FakeStepEngine, ThreadRecording, serve_six_images


class Recording(FakeStepEngine):
    """Remembers the seed of every image it admitted; ``broken``: every step fails (a dead device)."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken
        self.admitted: list[int] = []

    def admit(self, item: GenerationItem) -> int:
        self.admitted.append(item.seed)
        return super().admit(item)

    def step(self) -> list[int]:
        if self.broken:
            raise EngineFailure("CUDA error: an illegal memory access was encountered")
        return super().step()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def sample(metrics: Metrics, name: str, engine: str | None = None) -> float:
    value = metrics.registry.get_sample_value(name, {"engine": engine} if engine else None)
    return value or 0.0


def test_images_arriving_at_idle_engines_are_shared_out_and_each_engine_counts_its_own() -> None:
    async def test() -> None:
        engines = [Recording(), Recording()]
        for engine in engines:
            engine.gate = threading.Event()
        metrics = Metrics()
        steps = StepLoop(engines, max_batch_size=4, max_queue_items=32, metrics=metrics)
        steps.start()
        first = steps.submit([item(seed=1, steps=3)])
        await asyncio.to_thread(engines[0].step_started.acquire, True, 10)  # engine 0 runs seed 1
        # Engine 0 is busy, engine 1 idle: the next request goes to engine 1 (the least loaded).
        second = steps.submit([item(seed=2, steps=3), item(seed=3, steps=3)])
        await asyncio.to_thread(engines[1].step_started.acquire, True, 10)
        for engine in engines:
            engine.gate.set()
        results = await asyncio.gather(*first, *second)
        await steps.close()
        assert [r.seed for r in results] == [1, 2, 3]
        assert engines[0].admitted == [1] and engines[1].admitted == [2, 3]
        assert sample(metrics, "sd_images_generated_total", "0") == 1
        assert sample(metrics, "sd_images_generated_total", "1") == 2
        assert sample(metrics, "sd_engines_serving") == 2

    run(test)


def test_two_images_at_two_idle_engines_run_one_on_each() -> None:
    async def test() -> None:
        engines = [Recording(), Recording()]
        steps = StepLoop(engines, max_batch_size=4, max_queue_items=32, metrics=Metrics())
        steps.start()
        await asyncio.gather(*steps.submit([item(seed=1, steps=4), item(seed=2, steps=4)]))
        await steps.close()
        assert sorted([*engines[0].admitted, *engines[1].admitted]) == [1, 2]
        assert len(engines[0].admitted) == len(engines[1].admitted) == 1

    run(test)


def test_a_failing_device_fails_only_its_own_images_and_leaves_the_rotation() -> None:
    async def test() -> None:
        broken, healthy = Recording(broken=True), Recording()
        healthy.gate = threading.Event()  # hold the healthy engine so that the broken one gets work
        metrics = Metrics()
        steps = StepLoop([broken, healthy], max_batch_size=4, max_queue_items=32, metrics=metrics)
        steps.start()
        futures = steps.submit([item(seed=n, steps=2) for n in range(6)])
        while steps.lanes[0].serving:
            await asyncio.sleep(0.01)
        healthy.gate.set()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        failed = [n for n, o in enumerate(outcomes) if isinstance(o, BaseException)]
        assert failed and all(isinstance(outcomes[n], EngineFailure) for n in failed)
        # Only images the broken engine held failed, and each of them failed once there.
        assert set(failed) <= set(broken.admitted)
        assert all(outcomes[n].seed == n for n in range(6) if n not in failed)  # type: ignore[union-attr]
        # Out of rotation: later images all go to the healthy engine.
        later = await asyncio.gather(*steps.submit([item(seed=10 + n) for n in range(5)]))
        assert [r.seed for r in later] == [10, 11, 12, 13, 14]
        assert not {10, 11, 12, 13, 14} & set(broken.admitted)
        assert sample(metrics, "sd_engines_serving") == 1
        assert sample(metrics, "sd_engine_failures_total", "0") == 3
        assert sample(metrics, "sd_engine_failures_total", "1") == 0
        assert [lane.serving for lane in steps.lanes] == [False, True]
        await steps.close()

    run(test)


def test_images_a_failed_device_put_back_run_in_company_on_the_others() -> None:
    async def test() -> None:
        healthy, broken = Recording(), Recording(broken=True)
        healthy.gate = threading.Event()
        steps = StepLoop([healthy, broken], max_batch_size=4, max_queue_items=32, metrics=Metrics())
        steps.start()
        first = steps.submit([item(seed=1, steps=2)])
        await asyncio.to_thread(healthy.step_started.acquire, True, 10)  # engine 0 holds seed 1
        # Engine 1 takes all four, its step fails, each reruns alone there: 2 and 3 fail, and the
        # third failure in a row takes it out; 4 and 5 were not to blame.
        later = steps.submit([item(seed=n, steps=2) for n in (2, 3, 4, 5)])
        while steps.lanes[1].serving:
            await asyncio.sleep(0.01)
        healthy.gate.set()
        outcomes = await asyncio.gather(*first, *later, return_exceptions=True)
        await steps.close()
        assert [type(o).__name__ for o in outcomes] == [
            "GenerationResult", "EngineFailure", "EngineFailure", "GenerationResult", "GenerationResult"
        ]  # fmt: skip
        assert broken.admitted == [2, 3, 4, 5, 2, 3] and healthy.admitted == [1, 4, 5]
        assert [1, 4, 5] in healthy.steps or [4, 5] in healthy.steps  # together, not one by one

    run(test)


def test_when_every_engine_has_failed_new_requests_get_503_and_waiting_images_fail() -> None:
    async def test() -> None:
        steps = StepLoop([Recording(broken=True)], max_batch_size=1, max_queue_items=32, metrics=Metrics())
        steps.start()
        outcomes = await asyncio.gather(
            *steps.submit([item(seed=n) for n in range(5)]), return_exceptions=True
        )
        assert all(isinstance(o, EngineFailure | NotReadyError) for o in outcomes)
        assert sum(isinstance(o, NotReadyError) for o in outcomes) == 2  # 3 failed there, 2 waited
        with pytest.raises(NotReadyError, match="restart the server"):
            steps.submit([item()])
        await steps.close()

    run(test)


def test_sd_devices_lists_one_engine_per_device_and_sd_device_stays_a_shorthand() -> None:
    assert Settings(devices="cuda:0, cuda:2").device_list == ("cuda:0", "cuda:2")
    assert Settings(devices="cpu,cpu").device_list == ("cpu", "cpu")
    assert Settings(devices="all").device_list == ("all",)
    assert Settings(device="cuda:1").device_list == ("cuda:1",)
    assert Settings().device_list == ("all",)  # every CUDA device, or the default device without one
    for bad in ("gpu0", "cuda:0,,cuda:1", "all,cpu", ""):
        with pytest.raises(ValidationError, match="SD_DEVICES"):
            Settings(devices=bad)


class SlowLoad(FakeStepEngine):
    """An engine whose load and warm-up each take ``LOAD_S`` (recording when they ran)."""

    def __init__(self, device: str | None) -> None:
        super().__init__()
        self.device = device
        self._span("load")

    def _span(self, what: str) -> None:
        started = time.monotonic()
        time.sleep(LOAD_S)
        SPANS.append((f"{what} {self.device}", started, time.monotonic()))

    def warmup(self) -> None:
        self._span("warmup")


LOAD_S = 0.3
SPANS: list[tuple[str, float, float]] = []


def overlapping(spans: list[tuple[str, float, float]], prefix: str) -> bool:
    (_, a0, a1), (_, b0, b1) = [span for span in spans if span[0].startswith(prefix)]
    return a0 < b1 and b0 < a1


def test_every_device_loads_and_warms_up_at_once_before_readiness(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(settings: Settings, device: str | None) -> FakeStepEngine:
        if device == "cuda:7":
            raise ModelLoadError("CUDA error: invalid device ordinal")
        return SlowLoad(device)

    monkeypatch.setattr(lifecycle_module, "load_serving_engine", load)

    async def start(devices: str) -> Lifecycle:
        lifecycle = Lifecycle(Settings(model="/models/sd", devices=devices), Metrics())
        lifecycle.begin()
        await lifecycle.wait_started()
        return lifecycle

    async def test() -> None:
        SPANS.clear()
        ready = await start("cuda:0,cuda:1")
        assert ready.phase is Phase.READY and ready.runtime is not None
        assert [e.device for e in ready.runtime.engines] == ["cuda:0", "cuda:1"]  # type: ignore[attr-defined]
        assert overlapping(SPANS, "load") and overlapping(SPANS, "warmup")
        await ready.stop()
        failed = await start("cuda:0,cuda:7")
        assert failed.phase is Phase.FAILED and "invalid device ordinal" in failed.failure

    run(test)


def test_all_is_every_visible_cuda_device_or_the_default_device_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert resolve_devices(Settings()) == ["cuda:0", "cuda:1", "cuda:2"]
    assert resolve_devices(Settings(devices="cuda:2,cpu")) == ["cuda:2", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_devices(Settings(devices="all")) == [None]
    assert resolve_devices(Settings(device="cpu")) == ["cpu"]


def test_each_engine_is_loaded_warmed_up_and_run_in_one_thread_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch keeps per-thread state (CPU thread teams, the current CUDA device): a second thread
    made random:tiny's steps 3x slower on a 2-core CPU. Load, warm-up and every step share one."""
    monkeypatch.setattr(lifecycle_module, "load_serving_engine", lambda _, device: ThreadRecording(device))

    async def test() -> None:
        settings = Settings(model="/models/sd", devices="cuda:0,cuda:1")
        engines = await serve_six_images(settings)
        assert len(engines) == 2
        served = [engine for engine in engines if len(engine.threads) > 2]
        assert served, "no engine ran an image"
        for engine in served:
            assert {call for call, _ in engine.threads} == {"load", "warmup", "admit", "step", "retire"}
        threads = [{thread for _, thread in engine.threads} for engine in engines]
        assert all(len(each) == 1 for each in threads), threads  # one thread per engine
        assert threading.get_ident() not in set().union(*threads)  # never the event loop's
        assert len(set().union(*threads)) == len(engines)  # and not shared between engines

    run(test)
