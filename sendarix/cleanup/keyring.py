"""The relay's view of its sending domains: is this domain verified, and with which keys
does it sign?  Answered from a short-lived cache of the domain store, so a ``domains
verify`` run from the command line takes effect on every node within ``refresh``
seconds; private keys are decrypted with the node secret on first use."""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from sendarix.cleanup.dkim import SigningKey, load_signing_key
from sendarix.config.secret import NodeSecret, SecretError
from sendarix.interfaces import IDomainStore
from sendarix.model.domain import DKIMKey, SendingDomain


async def check_keys_open(
    store: IDomainStore, secret: NodeSecret | None, env_name: str
) -> None:
    """Fail with SecretError when ``store`` holds DKIM keys that ``secret`` cannot
    open (unset, or another secret): the start-up check for stores the relay cannot
    read before the reactor runs (Redis)."""
    keys = [k for sd in await store.list() for k in sd.keys]
    if not keys:
        return
    if secret is None:
        raise SecretError(
            f"${env_name} is not set, but {len(keys)} DKIM private key(s) are stored "
            "encrypted with it: set it to the node secret used by 'sendarix domains add'"
        )
    secret.decrypt(keys[0].private_encrypted)


@frozen
class _Entry:
    domain: SendingDomain | None
    expires: float


class DomainKeyring:
    """The relay's view of sending domains: which keys are verified, and the signing
    keys (decrypted on first use, then kept).  Domains are re-read from the store after
    ``refresh`` seconds, so a ``domains verify`` elsewhere takes effect that soon."""

    def __init__(
        self,
        store: IDomainStore,
        secret: NodeSecret | None,
        clock: IReactorTime,
        refresh: float = 10.0,
    ) -> None:
        self._store = store
        self._secret = secret
        self._clock = clock
        self._refresh = refresh
        self._cache: dict[str, _Entry] = {}
        self._loaded: dict[tuple[str, str, str], SigningKey] = {}

    def lookup(self, domain: str) -> Deferred[SendingDomain | None]:
        """The sending domain (cached), or None."""
        return self._entry(domain.lower()).addCallback(lambda e: e.domain)

    def signing_keys(self, domain: str) -> Deferred[tuple[SigningKey, ...]]:
        """The keys that sign mail from ``domain``: its verified keys."""
        def load(entry: _Entry) -> tuple[SigningKey, ...]:
            sd = entry.domain
            if sd is None:
                return ()
            return tuple(self._load(sd.domain, k) for k in sd.keys if k.verified)

        return self._entry(domain.lower()).addCallback(load)

    def _entry(self, domain: str) -> Deferred[_Entry]:
        now = self._clock.seconds()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires > now:
            return succeed(cached)

        def found(sd: SendingDomain | None) -> _Entry:
            entry = _Entry(sd, self._clock.seconds() + self._refresh)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[domain] = entry
            return entry

        return self._store.get(domain).addCallback(found)

    def _load(self, domain: str, key: DKIMKey) -> SigningKey:
        ident = (domain, key.selector, key.private_encrypted)
        loaded = self._loaded.get(ident)
        if loaded is None:
            if self._secret is None:
                raise SecretError("the node secret is not set: cannot open DKIM keys")
            pem = self._secret.decrypt(key.private_encrypted)
            loaded = load_signing_key(domain, key.selector, key.key_type, pem)
            self._loaded[ident] = loaded
        return loaded
