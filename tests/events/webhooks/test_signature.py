"""Standard Webhooks signatures, checked against the ``standardwebhooks`` package as an
independent implementation."""

from __future__ import annotations

import base64
import time

from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.trial.unittest import SynchronousTestCase

from sendarix.events.webhooks.signature import (
    BadSecret,
    generate_secret,
    headers,
    parse_secret,
    sign,
    verify,
)

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


class SecretTests(SynchronousTestCase):
    def test_generated_secret_round_trips(self) -> None:
        secret = generate_secret()
        self.assertTrue(secret.startswith("whsec_"))
        self.assertEqual(len(parse_secret(secret)), 32)
        self.assertNotEqual(secret, generate_secret())

    def test_prefix_optional(self) -> None:
        self.assertEqual(parse_secret(SECRET), parse_secret(SECRET.removeprefix("whsec_")))

    def test_bad_secrets(self) -> None:
        for bad in ("whsec_", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode(),
                    "whsec_" + base64.b64encode(bytes(65)).decode()):
            with self.assertRaises(BadSecret, msg=bad):
                parse_secret(bad)


class SignatureTests(SynchronousTestCase):
    def test_known_answer(self) -> None:
        """The example of the Standard Webhooks specification."""
        key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        body = b'{"test": 2432232314}'
        self.assertEqual(
            sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        )

    @given(st.text(min_size=1, max_size=40).filter(lambda s: "." not in s and s.strip() == s),
           st.binary(max_size=2000))
    def test_standardwebhooks_verifies(self, msg_id: str, body: bytes) -> None:
        """Whatever the id and body, the independent library accepts our headers."""
        now = int(time.time())
        h = headers([parse_secret(SECRET)], msg_id, now, body)
        Webhook(SECRET).verify(body, h, json_parse=False)

    def test_rotation_any_secret_verifies(self) -> None:
        """With two secrets, a receiver that knows either one accepts the POST, and one
        that knows neither refuses it."""
        new = generate_secret()
        body = b'{"type":"events"}'
        h = headers([parse_secret(SECRET), parse_secret(new)], "msg_1", int(time.time()), body)
        self.assertEqual(len(h["webhook-signature"].split(" ")), 2)
        Webhook(SECRET).verify(body, h, json_parse=False)
        Webhook(new).verify(body, h, json_parse=False)
        with self.assertRaises(WebhookVerificationError):
            Webhook(generate_secret()).verify(body, h, json_parse=False)
        self.assertTrue(verify([parse_secret(new)], h, body))
        self.assertFalse(verify([parse_secret(new)], h, body + b" "))

    def test_tampered_body_refused(self) -> None:
        h = headers([parse_secret(SECRET)], "msg_1", int(time.time()), b"{}")
        with self.assertRaises(WebhookVerificationError):
            Webhook(SECRET).verify(b"{ }", h, json_parse=False)

    def test_no_key(self) -> None:
        with self.assertRaises(ValueError):
            headers([], "msg_1", 0, b"")
