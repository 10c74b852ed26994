"""The webhook values: a batch's body and each event's sequence, built on the text."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.model.event import Event
from sendarix.model.webhook import (
    MAX_BATCH_EVENTS,
    DeadBatch,
    batch_body,
    new_batch_id,
    with_sequence,
)

texts = st.text(max_size=30)


class WebhookValueTests(SynchronousTestCase):
    @given(texts, texts, st.lists(texts, max_size=3), st.none() | st.integers(1, 10**9))
    def test_sequence_added_to_any_event(
        self, recipient: str, queue_id: str, tags: list[str], sequence: int | None
    ) -> None:
        """Whatever the event holds, the result is its JSON plus ``sequence``."""
        event = Event.make("delivered", 1.5, recipient=recipient, queue_id=queue_id, tags=tags)
        text = json.dumps(event.to_json(), separators=(",", ":"))
        self.assertEqual(json.loads(with_sequence(text, sequence)),
                         {**event.to_json(), "sequence": sequence})

    def test_body(self) -> None:
        items = [with_sequence('{"id":"a"}', 1), with_sequence('{"id":"b"}', None)]
        body = json.loads(batch_body(items, "2026-12-05T09:00:00.000Z"))
        self.assertEqual(body, {
            "type": "events", "timestamp": "2026-12-05T09:00:00.000Z",
            "data": {"events": [{"id": "a", "sequence": 1}, {"id": "b", "sequence": None}]},
        })  # fmt: skip
        for count in (0, MAX_BATCH_EVENTS + 1):
            with self.assertRaises(ValueError):
                batch_body(['{"id":"a"}'] * count, "t")
        with self.assertRaises(ValueError):
            with_sequence("[1]", 1)

    def test_ids_and_json(self) -> None:
        first, second = new_batch_id(), new_batch_id()
        self.assertTrue(first.startswith("msg_"))
        self.assertLess(first, second)
        dead = DeadBatch("msg_1", "hook", 1.0, 3, 2.0, "HTTP 500", 7)
        self.assertEqual(dead.to_json()["events"], 7)
