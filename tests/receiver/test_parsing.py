"""Parsing on its own: what a dead letter keeps."""

from __future__ import annotations

import time

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


class TestBrokenArrays:
    def test_closers_without_their_openers_split_in_linear_time(self) -> None:
        """Was a defect: the tolerant splitter asked `char in stack` at each closer, a scan of every bracket
        open, so `[` * n + `}` * n (no '{' open: each '}' scans all the '[') took time quadratic in n: 1.9 s at
        n = 20,000, 9.6 s at 40,000, about a minute at 100,000 (a 200 KB body, while a 10 MiB one may be sent).
        Now the stack's closers are counted by kind. 0.15 s here at n = 100,000; the bound leaves room for a
        slow machine and is far below the quadratic time."""
        n = 100_000
        began = time.process_time()
        parsed = parse_body(b"[" + b"[" * n + b"}" * n + b"]", "application/json", 0.0)
        assert time.process_time() - began < 10.0
        assert not parsed.raws and len(parsed.rejected) == 1
