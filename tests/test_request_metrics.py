"""Every answered request is counted once under its route's pattern, method and status, and timed
(the per-label series are made once and reused: these check the counts stay exact)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


async def counted(client, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_requests_are_counted_by_pattern_method_and_status(client):
    listed = await counted(client, "zenow_http_requests_total", method="GET", route="/api/sessions", status="200")
    timed = await counted(client, "zenow_http_request_duration_seconds_count", method="GET", route="/api/sessions")
    missing = await counted(client, "zenow_http_requests_total", method="GET", route="/api/sessions/<session_id>",
                            status="404")
    unmatched = await counted(client, "zenow_http_requests_total", method="GET", route="unmatched", status="404")
    bad = await counted(client, "zenow_http_requests_total", method="GET", route="/api/sessions", status="400")
    for _ in range(3):
        assert (await client.get("/api/sessions")).status_code == 200
    assert (await client.get("/api/sessions?limit=-1")).status_code == 400
    for sid in (98765, 98766):  # two paths, one pattern
        assert (await client.get(f"/api/sessions/{sid}")).status_code == 404
    assert (await client.get("/no/such/path")).status_code == 404

    assert await counted(client, "zenow_http_requests_total", method="GET", route="/api/sessions",
                         status="200") == listed + 3
    assert await counted(client, "zenow_http_request_duration_seconds_count", method="GET",
                         route="/api/sessions") == timed + 4
    assert await counted(client, "zenow_http_requests_total", method="GET", route="/api/sessions",
                         status="400") == bad + 1
    assert await counted(client, "zenow_http_requests_total", method="GET", route="/api/sessions/<session_id>",
                         status="404") == missing + 2
    assert await counted(client, "zenow_http_requests_total", method="GET", route="unmatched",
                         status="404") == unmatched + 1
