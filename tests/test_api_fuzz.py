"""Property test of the HTTP API from its own OpenAPI schema (schemathesis): no input gives a 500.

Every operation is called with generated valid and invalid requests against a real running
framegrid (real model, real broker); the answers must be anything but a server error and must
match the schema. The two endless streams (MJPEG, server-sent events) are left out: a generated
call to them never ends by design; their contract is in test_api and test_web.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.support.configs import TOKEN, env_with_token, wait_ready, write_api_config
from tests.support.procs import Framegrid, Mosquitto, free_port

# the WebRTC signalling routes take an SDP offer as text
schemathesis.serializer.alias("application/sdp", "text/plain")

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path],
               mosquitto: Mosquitto) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    cfg = write_api_config(tmp / "fg.toml", f"fgfuzz-{os.getpid()}", mosquitto, port, {"cam1": str(videos["cam1"])})
    env = env_with_token({**os.environ, "FRAMEGRID_STATE_DIR": str(tmp / "state"), "PYTHONUNBUFFERED": "1"})
    fg = Framegrid(cfg, env, tmp / "fg.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_ready(client)
        schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
        yield schema.exclude(path_regex=r"/mjpeg$|^/api/live$")
    finally:
        assert fg.stop() == 0, fg.output()
        log = fg.output()
        assert "Traceback" not in log, log[-5000:]
        assert TOKEN not in log


@pytest.mark.slow
def test_no_input_gives_a_server_error(api_schema: Any) -> None:
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    failures: list[str] = []
    calls: dict[int, int] = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case: Any) -> None:
            response = case.call(headers=AUTH, timeout=30)
            calls[response.status_code] = calls.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{op.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    print(f"{sum(calls.values())} calls over {len(operations)} operations, by status: {sorted(calls.items())}")
    assert sum(calls.values()) >= 10 * len(operations)
    assert calls.get(422, 0) > 0
