"""Two engines behind one HTTP server (in process, sharing random:tiny), one of them on a device that
fails every step: only the images it held fail, with 500 engine_failure; it is taken out of rotation
(/info, sd_engines_serving, a loud log line) while readiness stays true and the other serves."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from model.errors import EngineFailure
from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, metric_value, request_body


class BrokenDevice(GatedEngine):
    def step(self) -> list[int]:
        self.waiting.release()
        raise EngineFailure("CUDA error: an illegal memory access was encountered")


def engines_info(url: str) -> list[dict[str, Any]]:
    engines: list[dict[str, Any]] = httpx.get(f"{url}/info").json()["engines"]
    return engines


def test_a_failing_device_fails_only_its_images_and_leaves_the_rotation_while_the_other_serves(
    tiny_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    broken, healthy = BrokenDevice(tiny_engine), GatedEngine(tiny_engine)
    settings = Settings(max_batch_size=2, engine_max_failures=3)
    with ThreadServer(settings, [broken, healthy]) as server, ThreadPoolExecutor(4) as pool:
        assert [e["serving"] for e in engines_info(server.url)] == [True, True]
        healthy.gate.clear()  # the healthy engine holds its first step: the broken one gets work
        bodies = [request_body([f"prompt {n}"], seed=n) for n in range(4)]
        futures = [pool.submit(httpx.post, f"{server.url}/score", json=b, timeout=60) for b in bodies]
        deadline = time.monotonic() + 30
        while engines_info(server.url)[0]["serving"]:
            assert time.monotonic() < deadline, "the failing engine was never taken out of rotation"
            time.sleep(0.05)
        healthy.gate.set()
        answers = [future.result() for future in futures]
        failed = [a for a in answers if a.status_code != 200]
        assert failed and all(a.status_code == 500 for a in failed)
        assert {a.json()["error"]["code"] for a in failed} == {"engine_failure"}
        failed_prompts = {
            b["input_data"]["data"][0] for b, a in zip(bodies, answers, strict=True) if a in failed
        }
        assert failed_prompts <= {item.prompt for batch in broken.batches for item in batch}  # its own only
        # Still ready; the other engine serves everything from now on.
        assert httpx.get(f"{server.url}/").status_code == 200
        later = [pool.submit(httpx.post, f"{server.url}/score", json=b, timeout=60) for b in bodies]
        assert [f.result().status_code for f in later] == [200] * 4
        info = engines_info(server.url)
        assert [(e["serving"], e["failures"]) for e in info] == [(False, 3), (True, 0)]
        text = httpx.get(f"{server.url}/metrics").text
        assert metric_value(text, "sd_engines_serving") == 1
        assert metric_value(text, "sd_engine_failures_total", 'engine="0"') == 3
        assert metric_value(text, "sd_images_generated_total", 'engine="1"') == 4 + len(answers) - len(failed)
    assert any(
        r.levelno == logging.ERROR and "TAKEN OUT OF ROTATION" in r.getMessage() for r in caplog.records
    )
