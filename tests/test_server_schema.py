"""Schemathesis against the server's own OpenAPI schema: whatever it sends, no 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from test_server import make_service, running_server

from qwen_vl.server import ServerLimits

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402


def test_no_server_errors_for_any_request_the_schema_allows(checkpoint_dir: Path, tokenizer) -> None:
    limits = ServerLimits(max_tokens=3, max_n=2, max_images=1, max_prompt_tokens=128)
    with running_server(make_service(checkpoint_dir, tokenizer, limits=limits, max_batch_size=4)) as url:
        schema = schemathesis.openapi.from_url(url.removesuffix("/v1") + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case) -> None:
                case.call_and_validate(checks=[not_a_server_error], timeout=60)

            check()
