"""The address guard: the pure check over a table of addresses, and the connection
guard of the HTTP client, which must not open a connection to a refused address."""

from __future__ import annotations

import os
from typing import Any

import treq
import treq.client
from twisted.internet import reactor as _reactor
from twisted.internet.error import DNSLookupError
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface.verify import verifyObject

from sendarix.events.webhooks.dispatcher import guarded_agent
from sendarix.events.webhooks.ssrf import AddressRefused, GuardedEndpointFactory, refusal
from tests.support.tlsca import TestCA
from tests.support.webhooks import Receiver, StaticResolver

reactor: Any = _reactor

#: address, refused without allow_private, refused with it.
TABLE: list[tuple[str, bool, bool]] = [
    ("93.184.215.14", False, False),
    ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", False, False),
    ("127.0.0.1", True, False),
    ("127.255.255.254", True, False),
    ("::1", True, False),
    ("10.0.0.1", True, False),
    ("172.16.0.1", True, False),
    ("172.31.255.255", True, False),
    ("172.32.0.1", False, False),
    ("192.168.1.1", True, False),
    ("169.254.1.1", True, False),
    ("fe80::1", True, False),
    ("fe80::1%eth0", True, False),
    ("fd12:3456::1", True, False),
    ("fc00::1", True, False),
    ("100.64.0.1", True, False),
    ("192.0.2.1", True, False),
    ("2001:db8::1", True, False),
    # metadata services: never
    ("169.254.169.254", True, True),
    ("fd00:ec2::254", True, True),
    ("100.100.100.200", True, True),
    ("169.254.170.2", True, True),
    # IPv4 inside IPv6
    ("::ffff:127.0.0.1", True, False),
    ("::ffff:10.0.0.1", True, False),
    ("::ffff:169.254.169.254", True, True),
    ("::ffff:93.184.215.14", False, False),
    ("64:ff9b::a00:1", True, False),
    ("64:ff9b::5db8:d70e", False, False),
    ("2002:a00:1::1", True, False),
    ("::127.0.0.1", True, False),
    # never routable
    ("0.0.0.0", True, True),
    ("::", True, True),
    ("224.0.0.1", True, True),
    ("ff02::1", True, True),
    ("255.255.255.255", True, True),
    ("240.0.0.1", True, True),
    ("not-an-address", True, True),
]


class RefusalTableTests(SynchronousTestCase):
    def test_table(self) -> None:
        for address, strict, relaxed in TABLE:
            self.assertEqual(refusal(address) is not None, strict, address)
            self.assertEqual(refusal(address, allow_private=True) is not None, relaxed, address)

    def test_reason_names_the_range(self) -> None:
        self.assertEqual(refusal("127.0.0.1"), "a loopback address")
        self.assertEqual(refusal("169.254.169.254", True), "a cloud metadata address")
        self.assertIn("inside ::ffff:a00:1", refusal("::ffff:10.0.0.1") or "")


class GuardTests(SynchronousTestCase):
    """The guard with a MemoryReactor: no packet is ever sent."""

    def agent(self, table: dict[str, list[str]], allow_private: bool = False) -> Any:
        self.reactor = MemoryReactorClock()
        self.resolver = StaticResolver(table)
        agent, _ = guarded_agent(self.reactor, allow_private, resolver=self.resolver)
        return agent

    def test_factory_interface(self) -> None:
        factory = GuardedEndpointFactory(MemoryReactorClock(), resolver=StaticResolver({}))
        self.assertTrue(verifyObject(IAgentEndpointFactory, factory))
        endpoint = factory.endpointForURI(URI.fromBytes(b"https://hooks.example:8443/x"))
        self.assertEqual((endpoint.host, endpoint.port), ("hooks.example", 8443))
        self.assertIsNotNone(endpoint.tls)

    def test_private_name_refused_without_connecting(self) -> None:
        """A name that resolves to 10.0.0.1 is refused and no connection is attempted."""
        agent = self.agent({"internal.example": ["10.0.0.1"]})
        d = agent.request(b"POST", b"http://internal.example/hook")
        failure = self.failureResultOf(d)
        self.assertIn("10.0.0.1 is a private address", str(failure.value))
        self.assertTrue(failure.check(AddressRefused))
        self.assertEqual(self.resolver.asked, ["internal.example"])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_mixed_answers_connect_to_the_allowed_one(self) -> None:
        """The connection goes, by number, to the address that was checked."""
        agent = self.agent({"mixed.example": ["127.0.0.1", "93.184.215.14"]})
        agent.request(b"POST", b"http://mixed.example:8080/hook")
        self.assertEqual([(h, p) for h, p, *_ in self.reactor.tcpClients],
                         [("93.184.215.14", 8080)])

    def test_literal_and_metadata(self) -> None:
        agent = self.agent({})
        for url in (b"http://169.254.169.254/latest/meta-data/", b"http://[::ffff:127.0.0.1]/",
                    b"http://[fd00:ec2::254]/"):
            self.assertTrue(self.failureResultOf(agent.request(b"GET", url)).check(AddressRefused))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.resolver.asked, [])

    def test_allow_private(self) -> None:
        agent = self.agent({"internal.example": ["10.0.0.1"]}, allow_private=True)
        agent.request(b"POST", b"http://internal.example/hook")
        self.assertEqual([h for h, *_ in self.reactor.tcpClients], ["10.0.0.1"])

    def test_unknown_name(self) -> None:
        agent = self.agent({})
        failure = self.failureResultOf(agent.request(b"POST", b"http://nowhere.example/"))
        self.assertTrue(failure.check(DNSLookupError))
        self.assertEqual(self.reactor.tcpClients, [])


class LoopbackGuardTests(TestCase):
    """The guard over real loopback sockets: the fallback between addresses, and
    verified TLS for the URL's host name."""

    def setUp(self) -> None:
        self.receiver = Receiver(reactor)

    def listen_tls(self) -> tuple[int, Certificate]:
        ca = TestCA(os.path.abspath(self.mktemp()))
        cert_path, key_path = ca.issue("hooks.test")
        with open(cert_path) as c, open(key_path) as k:
            server = PrivateCertificate.loadPEM(c.read() + k.read())
        port = reactor.listenSSL(0, self.receiver.site(), server.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        with open(ca.ca_path) as f:
            return port.getHost().port, Certificate.loadPEM(f.read())

    def agent(self, trust: Certificate | None = None) -> Any:
        resolver = StaticResolver({"hooks.test": ["127.0.0.1"], "other.test": ["127.0.0.1"],
                                   "two.test": ["127.0.0.2", "127.0.0.1"]})
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust) if trust is not None else None
        agent, pool = guarded_agent(reactor, allow_private=True, resolver=resolver,
                                    tls_policy=policy)
        self.addCleanup(pool.closeCachedConnections)
        return agent

    async def post(self, agent: Any, url: str) -> int:
        response = await treq.client.HTTPClient(agent).post(url, data=b"{}", timeout=5)
        await treq.content(response)
        return int(response.code)

    async def test_tls_verified_for_the_host_name(self) -> None:
        port, trust = self.listen_tls()
        self.assertEqual(await self.post(self.agent(trust), f"https://hooks.test:{port}/h"), 200)
        tls_failed = (RequestTransmissionFailed, ResponseNeverReceived)
        with self.assertRaises(tls_failed) as wrong_name:
            await self.post(self.agent(trust), f"https://other.test:{port}/h")
        self.assertIn("other.test", repr(wrong_name.exception.reasons[0].value))
        with self.assertRaises(tls_failed):  # not trusted by the system roots
            await self.post(self.agent(), f"https://hooks.test:{port}/h")
        self.assertEqual(len(self.receiver.received), 1)

    async def test_next_address_when_one_refuses(self) -> None:
        """127.0.0.2 refuses the connection; the POST goes to 127.0.0.1."""
        port = reactor.listenTCP(0, self.receiver.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://two.test:{port.getHost().port}/h"
        self.assertEqual(await self.post(self.agent(), url), 200)
        self.assertEqual(len(self.receiver.received), 1)
