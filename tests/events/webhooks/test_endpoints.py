"""Webhook endpoints from ``[[webhook]]``: secrets from the environment, subscriptions."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sendarix.config.errors import ConfigError
from sendarix.config.loader import describe, parse_config
from sendarix.events.webhooks.endpoints import Subscriptions, endpoints_from_config
from sendarix.events.webhooks.signature import generate_secret, parse_secret
from sendarix.model.event import Event

CONFIG = {
    "webhook": [
        {"tenant": "acme", "url": "https://a.example/h", "events": ["delivered", "bounced"],
         "secret_env": "HOOK_A", "name": "a", "retry_schedule": ["0s", "1m"]},
        {"tenant": "globex", "url": "https://g.example/h", "secret_env": "HOOK_G"},
    ],
}  # fmt: skip


class EndpointTests(SynchronousTestCase):
    def test_from_config(self) -> None:
        old, new, g = generate_secret(), generate_secret(), generate_secret()
        config = parse_config(CONFIG, "/tmp")
        a, b = endpoints_from_config(config, {"HOOK_A": f"{old} {new}", "HOOK_G": g})
        self.assertEqual((a.name, a.tenant, a.retry_schedule), ("a", "acme", (0.0, 60.0)))
        self.assertEqual(a.keys, (parse_secret(old), parse_secret(new)))
        self.assertTrue(b.name.startswith("globex-"))
        subs = Subscriptions.of([a, b])
        event = Event.make("delivered", 0.0, tenant="acme")
        self.assertEqual(subs.match(event), ["a"])
        self.assertEqual(subs.match(Event.make("accepted", 0.0, tenant="acme")), [])
        self.assertEqual(subs.match(Event.make("accepted", 0.0, tenant="globex")), [b.name])
        self.assertEqual(subs.match(Event.make("delivered", 0.0, tenant="other")), [])

    def test_without_environment_no_keys(self) -> None:
        """The command line lists endpoints without their secrets."""
        (a, _) = endpoints_from_config(parse_config(CONFIG, "/tmp"), None)
        self.assertEqual(a.keys, ())

    def test_secret_errors_name_the_key(self) -> None:
        config = parse_config(CONFIG, "/tmp")
        for environ, fragment in (
            ({"HOOK_G": generate_secret()}, "HOOK_A is not set"),
            ({"HOOK_A": "whsec_!!", "HOOK_G": generate_secret()}, "base64"),
            ({"HOOK_A": "  ", "HOOK_G": generate_secret()}, "no webhook secret"),
        ):
            with self.assertRaises(ConfigError) as caught:
                endpoints_from_config(config, environ)
            self.assertIn("webhook[0].secret_env", str(caught.exception))
            self.assertIn(fragment, str(caught.exception))
        unsigned = parse_config({"webhook": [{"url": "https://x.example/"}]}, "/tmp")
        with self.assertRaises(ConfigError):
            endpoints_from_config(unsigned, {})

    def test_described(self) -> None:
        text = describe(parse_config({**CONFIG, "webhooks": {"allow_private": True}}, "/tmp"))
        self.assertIn("webhooks: a (acme), globex-", text)
        self.assertIn("private destinations allowed", text)
