"""The API against its own OpenAPI document: schemathesis generates requests from
``docs/openapi.yaml`` and sends them to a running node; no answer may be a 5xx, and
every answer must match the document (status, content type, body schema)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from twisted.trial import unittest

from tests.control.api.test_api import ApiTestCase
from tests.support.relay import in_thread

#: Generated requests per operation (bounded: the suite must stay fast).
EXAMPLES = int(os.environ.get("SENDARIX_SCHEMA_EXAMPLES", "25"))


def run_schema(base_url: str, key: str) -> list[str]:
    """Every operation, ``EXAMPLES`` generated requests each; the failures found."""
    import schemathesis
    from schemathesis import checks

    from sendarix.control.api.app import load_openapi

    # What the document promises about answers.  (Whether every schema-valid body is
    # accepted is not among them: the document cannot say, for instance, that
    # "from" must be a deliverable address; those get a 400 naming the field.)
    wanted = [
        checks.not_a_server_error, checks.status_code_conformance,
        checks.content_type_conformance, checks.response_schema_conformance,
        checks.response_headers_conformance,
    ]

    schema = schemathesis.openapi.from_dict(load_openapi())
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            headers = {"Authorization": f"Bearer {key}"}
            response = case.call(base_url=base_url, headers=headers, timeout=10)
            case.validate_response(response, checks=wanted)

        try:
            check()
        except Exception as e:  # noqa: BLE001 - collected and reported together
            failures.append(f"{operation.label}: {str(e)[:2000]}")
    return failures


class SchemaTests(ApiTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        # With a node secret, so that adding a sending domain can succeed.
        from tests.cleanup.test_domains import SECRET

        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        await super().setUp()

    async def test_generated_requests_match_the_document(self) -> None:
        """No 5xx and no answer outside the document, for an operator key (which may
        call everything)."""
        failures = await in_thread(run_schema, self.base, self.operator)
        self.assertEqual(failures, [], "\n\n".join(failures))


del unittest
