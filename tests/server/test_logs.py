"""Structured logs: one JSON object per line, carrying the current request's id."""

from __future__ import annotations

import json
import logging

from weir.logs import JsonFormatter, request_id_var


def test_json_lines_carry_the_request_id_and_extra_fields() -> None:
    record = logging.makeLogRecord({"name": "weir.test", "levelname": "INFO", "msg": "served %s", "args": ("x",)})
    record.model = "mlp"
    token = request_id_var.set("req-42")
    try:
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert entry["msg"] == "served x"
    assert entry["request_id"] == "req-42"
    assert entry["model"] == "mlp"
    assert entry["level"] == "info"


def test_lines_outside_a_request_have_no_request_id() -> None:
    record = logging.makeLogRecord({"name": "weir.test", "levelname": "WARNING", "msg": "idle"})
    assert "request_id" not in json.loads(JsonFormatter().format(record))
