"""Schemathesis over the real app's OpenAPI document (/swagger.json), served by uvicorn on
random:tiny: whatever the generated input, no route answers a server error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer

# One step and small batches keep every valid request cheap on the CPU; the bound on examples
# keeps the whole module well under a minute.
SETTINGS = Settings(
    model="random:tiny", max_steps=1, max_prompts=2, max_batch_wait_ms=0, request_timeout_s=60
)
EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def engine(tiny_engine: Any) -> GatedEngine:
    return GatedEngine(tiny_engine)


@pytest.fixture(scope="module")
def api_schema(engine: GatedEngine) -> Iterator[Any]:
    with ThreadServer(SETTINGS, engine) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/swagger.json")


def test_no_generated_request_gets_a_server_error(api_schema: Any, engine: GatedEngine) -> None:
    # Schemathesis's own pytest plugin does not run on this pytest; its strategies do, driven here
    # by hypothesis, one operation after another.
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/score", "/info", "/"}
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        try:
            call()
        except Exception as error:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {error}")
    assert not failures, "\n\n".join(failures)
    assert engine.batches, "no generated /score request was valid enough to reach the engine"
