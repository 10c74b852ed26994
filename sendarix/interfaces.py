"""The pluggable parts of Sendarix, as zope interfaces.

Each interface has at least one implementation chosen by configuration; tests check
every implementation with ``zope.interface.verify.verifyObject``.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISpool(Interface):
    """Durable storage of accepted mail, with per-destination leases.

    Deliveries are keyed by (queue id, destination domain); each recipient keeps its own
    state.  Every method returns a Deferred.  ``now`` and lease times are POSIX seconds.
    """

    def start():
        """Open the store (create tables, check settings); Deferred fires when ready."""

    def stop():
        """Flush and close; Deferred fires when closed."""

    def enqueue(self):
        """Store a L{sendarix.model.NewMessage} durably.

        The Deferred fires (with None) only after the message and all its recipients are
        on stable storage, and fails if nothing was stored; never half-written.
        """

    def lease_due(self, now, limit, lease_for):
        """Lease up to ``limit`` deliveries due at ``now`` to ``node`` for ``lease_for``
        seconds: a list of L{sendarix.model.LeasedDelivery}.  A delivery whose lease has
        expired is due again (another node died holding it)."""

    def renew(self, domain, node, expires):
        """Extend ``node``'s lease on a delivery; True when the lease was still ours."""

    def release(self, domain, node):
        """Give a lease back without an outcome (graceful stop)."""

    def reclaim(self):
        """Release every lease ``node`` holds (a node restarting under its own name)."""

    def complete(self, domain, node, outcomes, now):
        """Record L{sendarix.model.RecipientOutcome}s and release the lease.

        Deferred recipients are due again at their ``next_attempt``; a message whose
        recipients are all final is removed with its body.
        """

    def get(self):
        """A L{sendarix.model.StoredMessage}, or None."""

    def body(self):
        """The message bytes, or None."""

    def list_messages(self=None, domain=None, limit=100, after=None):
        """StoredMessages in queue-id order after ``after``, filtered by a recipient status
        value and/or destination domain."""

    def stats():
        """A L{sendarix.model.QueueStats}."""

    def retry(self, now):
        """Make every unfinished recipient of a message due at ``now``; the count."""

    def delete(self):
        """Remove a message and its body; True when it existed."""


class IEventSink(Interface):
    """Where outcome events (L{sendarix.events.Event}) go."""

    def emit(self):
        """Record one event; may return a Deferred that fires once it is stored."""


class IEventLog(IEventSink):
    """An event sink that can also be searched (the delivery log)."""

    def search(self):
        """A Deferred L{sendarix.events.EventPage} for an L{sendarix.events.EventQuery},
        newest first."""

    def trim(self):
        """Delete events older than ``before`` (retention); the count deleted."""


class ICredentialStore(Interface):
    """SMTP credentials and API keys: hashed secrets and their scopes."""

    def add(self, tenant, domains, networks, scopes, rate, sandbox):
        """Create a credential; Deferred (Credential, secret).  The secret is shown once."""

    def get(self):
        """The L{sendarix.credentials.Credential} (active or revoked), or None."""

    def list():
        """Every credential."""

    def revoke(self):
        """Revoke at once; True when it existed."""

    def rotate(self):
        """Replace the secret; Deferred new secret (old one stops working at once)."""


class IAuthLimiter(Interface):
    """Slows, then locks out, client addresses that keep failing AUTH."""

    def is_locked(self, now):
        """True while ``ip`` is locked out."""

    def delay_for(self, now):
        """Seconds to wait before answering ``ip``'s next AUTH failure."""

    def failed(self, now):
        """Record a failure."""

    def succeeded(self, now):
        """Record a success (forgets earlier failures)."""


class IContentFilter(Interface):
    """Accepts, rejects or tags a message by content before it is queued."""

    name = Attribute("A short name for logs.")

    def check(self, body):
        """Deferred None to accept, or a L{sendarix.model.Reply} to refuse."""


class ISubmitter(Interface):
    """The avatar of an authenticated submission client (twisted.cred): the portal
    returns the client's L{sendarix.credentials.Credential} under this interface."""
