"""Schema-driven fuzzing: schemathesis reads /openapi.json and sends what the schema allows (and,
in its negative mode, what it forbids); no answer may be a 5xx. Tight limits keep every
generation it triggers tiny, so the run stays bounded."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from live_server import running
from edgediff.server import Limits, create_app


@pytest.fixture(scope="module")
def api_schema(default_pipe):
    limits = Limits(max_side=64, max_pixels=64 * 64, max_steps=1, max_images=2, max_queue=4,
                    max_body_bytes=1 << 20, max_input_pixels=256 * 256)
    with running(create_app(default_pipe, limits=limits)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call(timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, response.text
