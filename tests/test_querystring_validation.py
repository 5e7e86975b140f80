"""zenow's `validate_querystring` (the model's own validator, built once) answers exactly what
quart-schema's (a `TypeAdapter` per request) answers, for good and bad query strings alike, and
documents the same parameters."""

from __future__ import annotations

from typing import Any

import pytest
from quart import jsonify
from quart_schema import QuartSchema, RequestSchemaValidationError
from quart_schema import validate_querystring as schema_validate_querystring
from quart_trio import QuartTrio

from zenow.routes._validation import describe_validation_error, first_bad_field, validate_querystring
from zenow.routes.sessions import MessagePage, SessionPage

QUERIES = ["", "limit=5", "limit=5&offset=3", "limit=-1", "offset=-5", "limit=abc", "limit=10001", "limit=1&limit=2",
           "limit[]=3", "offset=9223372036854775808", "limit=1.5", "limit=%20", "other=1", "limit=", "limit=0x10",
           "limit=%E2%82%AC", "offset=1e3", "limit=007"]


def build() -> QuartTrio:
    app = QuartTrio("equivalence")
    QuartSchema(app, swagger_ui_path=None, redoc_ui_path=None, scalar_ui_path=None)

    for name, model in (("sessions", SessionPage), ("messages", MessagePage)):
        async def theirs(query_args: Any) -> Any:
            return jsonify(query_args.model_dump())

        async def ours(query_args: Any) -> Any:
            return jsonify(query_args.model_dump())

        theirs.__name__, ours.__name__ = f"theirs_{name}", f"ours_{name}"
        app.get(f"/theirs/{name}")(schema_validate_querystring(model)(theirs))
        app.get(f"/ours/{name}")(validate_querystring(model)(ours))

    @app.errorhandler(RequestSchemaValidationError)
    async def invalid(error: RequestSchemaValidationError) -> Any:
        return jsonify({"detail": describe_validation_error(error.validation_error),
                        "param": first_bad_field(error.validation_error)}), 400

    return app


@pytest.mark.parametrize("query", QUERIES)
async def test_every_query_gets_the_same_answer_as_from_quart_schema(query):
    client = build().test_client()
    for name in ("sessions", "messages"):
        theirs = await client.get(f"/theirs/{name}?{query}")
        ours = await client.get(f"/ours/{name}?{query}")
        assert (ours.status_code, await ours.get_data()) == (theirs.status_code, await theirs.get_data())


async def test_the_session_list_documents_its_query_parameters(client):
    operation = (await client.get("/openapi.json")).json()["paths"]["/api/sessions"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
    assert set(parameters) == {"limit", "offset"}
    assert parameters["limit"]["schema"]["maximum"] == 10_000
