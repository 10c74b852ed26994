"""Tests for :mod:`sendarix.ingress.policy`: every relay rule without a session, each
refusal with the exact reply the server sends."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.ingress import policy
from sendarix.ingress.ratelimit import RateLimiter
from sendarix.model.credential import Credential
from sendarix.model.domain import DKIMKey, SendingDomain
from sendarix.model.message import Reply

APP = Credential("app", "acme", secret_hash="h1")


def domain(name: str, tenant: str | None, verified: bool) -> SendingDomain:
    key = DKIMKey("s1", "rsa", "pub", "enc", 0.0, 1.0 if verified else None)
    return SendingDomain(name, tenant, 0.0, (key,))


class RelayTests(SynchronousTestCase):
    def test_authenticated_always_may(self) -> None:
        for mode in ("required", "optional", "none"):
            self.assertIsNone(policy.relay_refusal(mode, policy.Client("192.0.2.1", False, APP)))

    def test_required(self) -> None:
        """Without AUTH on a required listener: 530 5.7.0, trusted or not."""
        for trusted in (True, False):
            self.assertEqual(
                policy.relay_refusal("required", policy.Client("10.0.0.1", trusted, None)),
                Reply(530, "5.7.0", "Authentication required"),
            )

    def test_optional(self) -> None:
        """Optional AUTH: trusted networks relay, others must authenticate."""
        self.assertIsNone(policy.relay_refusal("optional", policy.Client("10.0.0.1", True, None)))
        self.assertEqual(
            policy.relay_refusal("optional", policy.Client("192.0.2.1", False, None)),
            policy.AUTH_REQUIRED,
        )

    def test_none(self) -> None:
        """No AUTH offered: anyone starts a transaction; trusted networks relay, anyone
        else is refused 554 5.7.1 at each recipient."""
        trusted = policy.Client("10.0.0.1", True, None)
        outside = policy.Client("192.0.2.1", False, None)
        self.assertIsNone(policy.relay_refusal("none", trusted))
        self.assertIsNone(policy.relay_refusal("none", outside))
        self.assertIsNone(policy.recipient_relay_refusal("none", trusted))
        self.assertEqual(
            policy.recipient_relay_refusal("none", outside),
            Reply(554, "5.7.1", "Relay access denied"),
        )
        for mode in ("required", "optional"):
            self.assertIsNone(policy.recipient_relay_refusal(mode, outside))


class CredentialTests(SynchronousTestCase):
    def test_still_valid(self) -> None:
        self.assertIsNone(policy.credential_refusal(APP, APP, "192.0.2.1"))

    def test_revoked_rotated_gone_or_moved(self) -> None:
        """Revoked, rotated, deleted or not allowed from this address: 530 5.7.0."""
        void = Reply(530, "5.7.0", "Credential no longer valid, authenticate again")
        for current in (
            None,
            Credential("app", "acme", secret_hash="h1", revoked_at=5.0),
            Credential("app", "acme", secret_hash="h2"),
            Credential("app", "acme", secret_hash="h1", networks=["10.0.0.0/8"]),
        ):
            self.assertEqual(policy.credential_refusal(APP, current, "192.0.2.1"), void)

    def test_sender_domains(self) -> None:
        """A credential limited to domains refuses other senders, exact match only."""
        cred = Credential("app", "acme", domains=["example.com"])
        limiter = RateLimiter()
        self.assertIsNone(policy.sender_refusal(cred, "a@EXAMPLE.com", limiter, 0.0))
        for sender in ("a@mail.example.com", "a@other.test", ""):
            self.assertEqual(
                policy.sender_refusal(cred, sender, limiter, 0.0),
                Reply(550, "5.7.1", "Sender address not allowed for this credential"),
            )

    def test_credential_rate(self) -> None:
        """``rate_per_minute`` messages, then 450 4.7.1 until the minute moves on."""
        cred = Credential("app", "acme", rate_per_minute=2)
        limiter = RateLimiter()
        answers = [policy.sender_refusal(cred, "a@x.test", limiter, 0.0) for _ in range(3)]
        self.assertEqual(answers, [None, None, policy.MESSAGE_RATE])
        self.assertIsNone(policy.sender_refusal(cred, "a@x.test", limiter, 30.0))


class RateTests(SynchronousTestCase):
    def test_tenant_rate(self) -> None:
        limiter = RateLimiter()
        rates = {"acme": (1.0, 60.0)}
        self.assertIsNone(policy.tenant_rate_refusal("acme", rates, limiter, 0.0))
        self.assertEqual(
            policy.tenant_rate_refusal("acme", rates, limiter, 1.0),
            Reply(450, "4.7.1", "Tenant message rate limit exceeded, try again later"),
        )
        self.assertIsNone(policy.tenant_rate_refusal("other", rates, limiter, 1.0))

    def test_recipient_rate(self) -> None:
        limiter = RateLimiter()
        self.assertIsNone(policy.recipient_rate_refusal(None, (1.0, 60.0), limiter, 0.0))
        self.assertIsNone(policy.recipient_rate_refusal(APP, None, limiter, 0.0))
        self.assertIsNone(policy.recipient_rate_refusal(APP, (1.0, 60.0), limiter, 0.0))
        self.assertEqual(policy.recipient_rate_refusal(APP, (1.0, 60.0), limiter, 1.0),
                         Reply(450, "4.7.1", "Recipient rate limit exceeded, try again later"))

    @given(st.integers(0, 200), st.integers(1, 100))
    def test_recipient_count(self, accepted: int, maximum: int) -> None:
        refusal = policy.recipient_count_refusal(accepted, maximum)
        if accepted < maximum:
            self.assertIsNone(refusal)
        else:
            self.assertEqual(refusal, Reply(452, "4.5.3", "Too many recipients"))

    def test_suppressed(self) -> None:
        self.assertIsNone(policy.suppression_refusal(None))
        self.assertEqual(policy.suppression_refusal(object()),
                         Reply(550, "5.1.1", "recipient suppressed"))
        self.assertEqual(policy.suppression_refusal(None, simulated=True),
                         Reply(550, "5.1.1", "recipient suppressed"))

    def test_simulator_suppressed(self) -> None:
        """The simulator's ``suppressed`` local part is on every list at its domain,
        and at any domain for a sandbox credential."""
        domain = "sim.test"
        for address in ("suppressed@sim.test", "Suppressed+x@SIM.test"):
            self.assertTrue(policy.simulator_suppressed(address, domain, False), address)
        for address in ("suppressed@other.test", "suppressedx@sim.test", "ok@sim.test",
                        "suppressed"):
            self.assertFalse(policy.simulator_suppressed(address, domain, False), address)
        self.assertTrue(policy.simulator_suppressed("suppressed@other.test", None, True))
        self.assertFalse(policy.simulator_suppressed("ok@other.test", domain, True))


class VerifiedDomainTests(SynchronousTestCase):
    def test_lookup_needed(self) -> None:
        self.assertTrue(policy.needs_verified_domain(True, "a@x.test"))
        self.assertFalse(policy.needs_verified_domain(True, ""))  # bounces go through
        self.assertFalse(policy.needs_verified_domain(False, "a@x.test"))

    def test_verified_domain(self) -> None:
        """Only a usable domain of this tenant (or of no tenant) may send."""
        refused = Reply(550, "5.7.1", "Sender domain x.test is not a verified sending domain")
        self.assertIsNone(policy.verified_domain_refusal("x.test", domain("x.test", "acme", True),
                                                         "acme"))
        self.assertIsNone(policy.verified_domain_refusal("x.test", domain("x.test", None, True),
                                                         "acme"))
        for found in (None, domain("x.test", "acme", False), domain("x.test", "other", True)):
            self.assertEqual(policy.verified_domain_refusal("x.test", found, "acme"), refused)

    @given(st.from_regex(r"[a-z0-9.]{0,20}@[A-Za-z0-9.-]{1,30}", fullmatch=True))
    def test_domain_of(self, sender: str) -> None:
        self.assertEqual(policy.domain_of(sender), sender.rpartition("@")[2].lower())
        self.assertEqual(policy.domain_of(""), "")
