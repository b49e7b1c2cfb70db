"""Parsing on its own: what a dead letter keeps."""

from __future__ import annotations

import time

import pytest

from receiver.errors import BodyError
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


class TestUnterminatedStrings:
    GOOD = b'{"event":{"action":"a","id":"%d"}}'

    def assert_only_it_is_lost(self, bad: bytes) -> None:
        """`bad` second of four elements: the three good ones taken, `bad` alone dead-lettered."""
        good = [self.GOOD % i for i in range(3)]
        parsed = parse_body(b"[" + b",".join([good[0], bad, *good[1:]]) + b"]", "application/json", 0.0)
        assert [bytes(raw) for raw in parsed.raws] == good
        assert [item.raw for item in parsed.rejected] == [bad]

    def test_the_elements_after_one_are_found_again(self) -> None:
        self.assert_only_it_is_lost(b'{"event":{"action":"x","note":"unterminated}}')

    def test_a_wrapper_nested_in_a_truncated_body_is_not_taken_for_an_element(self) -> None:
        """Without the array's closing ']' a wrapper nested in the broken element cannot be told from one after
        it (the closers that would say so may be what is missing): nothing after the break is taken."""
        body = b'[{"event":{"action":"a"}},{"event":{"action":"b","note":"x,"changes":[{"event":{"action":"nested"}}'
        parsed = parse_body(body, "application/json", 0.0)
        assert [bytes(raw) for raw in parsed.raws] == [b'{"event":{"action":"a"}}']

    def test_places_to_start_again_are_tried_a_bounded_number_of_times(self) -> None:
        """Each place tried decodes up to the rest of the body: 100,000 of them, none followed by strict JSON to
        the end, would cost time quadratic in the body without the bound (0.58 s at 4,000 here, 1.76 s at
        8,000, minutes at 100,000). With it, 8 tries: 0.12 s here, against 0.06 s trying none."""
        body = b'[{"event":{"a":"x' + b',{"event":{}}' * 100_000 + b",]"
        began = time.process_time()
        with pytest.raises(BodyError):
            parse_body(body, "application/json", 0.0)
        assert time.process_time() - began < 10.0

    def test_a_bracket_that_ended_the_array_early_stays_in_its_element(self) -> None:
        """A slice copied into an element (`…"keySu","source":"s"}]ffix":"k"}`) closes it and the array: what
        follows the ']' was one dead letter "data after the end of the JSON array", whole elements included.
        Now the broken element is one dead letter, from its start to the next element, and the rest delivered."""
        self.assert_only_it_is_lost(b'{"event":{"action":"x"},"keySu","source":"s"}]ffix":"k"}')

    def test_what_follows_a_whole_array_is_not_looked_into(self) -> None:
        """Once a whole last element closed the array, what follows is data after it, kept as one dead letter,
        even when it holds wrappers (here one nested in a list, in a second, truncated array)."""
        tail = b'{"event":{"action":"x","changes":[{"a":1},{"event":{"action":"nested"}}]'
        for between in (b"", b",", b"]"):
            parsed = parse_body(b'[{"event":{"action":"a"}}]' + between + tail, "application/json", 0.0)
            assert [bytes(raw) for raw in parsed.raws] == [b'{"event":{"action":"a"}}']
            assert [item.reason for item in parsed.rejected] == ["data after the end of the JSON array"]

    def test_ndjson_with_array_lines_keeps_its_object_lines(self) -> None:
        """A body declared NDJSON whose lines are objects and arrays is read line by line, as before a broken
        array was looked into again: its object lines delivered, the array lines dead-lettered."""
        lines = [b'[{"event":{"action":"a"}}]', b'{"event":{"action":"l2"}}', b'{"event":{"action":"l3"}}']
        lines.append(b'[{"event":{"action":"b"}},{"event":{"action":"c"}}]')
        parsed = parse_body(b"\n".join(lines), "application/x-ndjson", 0.0)
        assert [bytes(raw) for raw in parsed.raws] == lines[1:3]
        assert [item.raw for item in parsed.rejected] == [lines[0], lines[3]]


class TestReasons:
    @pytest.mark.parametrize(
        "bad", [b'"keySuffix":"k"}', b'1, "a"', b'"event"}', b"[1] x"], ids=["string", "number", "brace", "array"]
    )
    def test_a_line_that_is_no_json_is_said_so_not_named_for_its_first_value(self, bad: bytes) -> None:
        """Was a defect: the typed decoder gave up at a first value of the wrong type before it saw the rest, so
        the dead letter of `"keySuffix":"k"}` (half of a wrapper) said "element is a JSON string, not an object",
        and a body of such lines alone was taken (200, everything dead-lettered) rather than refused as no JSON."""
        good = b'{"event":{"action":"a"},"keySuffix":"k1"}'
        parsed = parse_body(good + b"\n" + bad + b"\n", "application/x-ndjson", 0.0)
        assert [bytes(raw) for raw in parsed.raws] == [good]
        (rejected,) = parsed.rejected
        assert rejected.raw == bad and rejected.reason.startswith("line 2: not valid JSON"), rejected.reason
        with pytest.raises(BodyError) as refused:
            parse_body(bad + b"\n" + bad + b"\n", "application/x-ndjson", 0.0)
        assert refused.value.status == 400 and "not valid JSON" in str(refused.value)

    def test_an_element_of_another_type_is_named_for_it(self) -> None:
        parsed = parse_body(b'{"event":{"action":"a"}}\n"text"\n[1]\n', "application/x-ndjson", 0.0)
        assert [item.reason for item in parsed.rejected] == [
            "line 2: element is a JSON string, not an object",
            "line 3: element is a JSON array, not an object",
        ]
