"""Parsing on its own: what a dead letter keeps."""

from __future__ import annotations

from receiver.parsing import parse_body


class TestDeadLetterBytes:
    def test_a_pretty_printed_element_without_an_event_is_kept_as_received(self) -> None:
        bad = b'{"no": "event",\n  "x": 1}'
        parsed = parse_body(b"[" + bad + b', {"event":{"action":"a"}}]', "application/json", 0.0)
        assert [item.raw for item in parsed.rejected] == [bad]
        assert [bytes(raw) for raw in parsed.raws] == [b'{"event":{"action":"a"}}']

    def test_a_pretty_printed_bare_event_is_wrapped_on_one_line(self) -> None:
        parsed = parse_body(b'[{"action": "a",\n "id": "i"}, 1]', "application/json", 0.0)
        assert [bytes(raw) for raw in parsed.raws] == [b'{"event":{"action":"a","id":"i"}}']
        assert parsed.keys == ["i"]
