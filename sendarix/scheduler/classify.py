"""What a receiving server's reply means for one recipient: delivered, deferred or bounced.

The verdict follows the reply code (docs/delivery.md): 2xx delivered, 4xx deferred,
5xx bounced, except 5xx replies whose enhanced code is configured as soft (5.2.2 mailbox
full by default), which are deferred and become hard only when the message expires.

Every deferral and bounce also gets a category from a rule table (``BounceRules``): an
ordered list of regular expressions over the reply text, optionally narrowed to reply
codes, first match wins, with a fallback on the enhanced status code.  The default table
ships in the package (``sendarix/scheduler/bounce-rules.toml``); ``etc/bounce-rules.toml`` is
the copy an operator edits.

Two more signals come out of a reply: greylisting (a 4xx other than 421 with greylist
wording, retried after a short window instead of the long schedule) and throttling
(421, or a 4.7.x reply with rate-limit wording: the destination wants us to slow down).
A delay the server names ("try again in 300 seconds") is extracted as ``retry_after``.

Everything here is pure: no I/O besides reading a rule file.
"""

from __future__ import annotations

import enum
import functools
import math
import re
import tomllib
from collections.abc import Collection, Iterable, Iterator, Mapping
from importlib import resources
from typing import Any

from attrs import field, frozen

from sendarix.config.errors import ConfigError
from sendarix.model.message import RecipientStatus, Reply

__all__ = [
    "CATEGORIES",
    "DEFAULT_SOFT_CODES",
    "BounceRule",
    "BounceRules",
    "Classification",
    "Verdict",
    "classify",
    "code_matches",
    "retry_hint",
]

#: Every bounce category (docs/delivery.md), in the order the table groups them.
CATEGORIES: tuple[str, ...] = (
    "bad-mailbox",
    "bad-domain",
    "inactive",
    "quota",
    "spam/policy",
    "reputation/block",
    "rate-limit",
    "greylist",
    "content",
    "routing",
    "protocol",
    "other",
)

#: Enhanced codes of 5xx replies that are retried like 4xx by default (mailbox full).
DEFAULT_SOFT_CODES: tuple[str, ...] = ("5.2.2",)

# The packaged rule table; etc/bounce-rules.toml is a byte-identical copy.
_DEFAULT_TABLE = ("sendarix.scheduler", "bounce-rules.toml")


class Verdict(enum.Enum):
    """The outcome of one delivery attempt for one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"

    @property
    def status(self) -> RecipientStatus:
        """The recipient status this verdict leads to (before lifetime checks)."""
        return RecipientStatus(self.value)


@frozen
class Classification:
    """What one reply means.

    ``category`` is None only for DELIVERED.  ``greylist`` is True for a greylisting
    deferral; ``retry_after`` is the delay in seconds the server asked for (deferrals
    only); ``throttle`` tells the shaping layer the destination wants us to slow down.
    """

    verdict: Verdict
    category: str | None
    greylist: bool = False
    retry_after: float | None = None
    throttle: bool = False


# -- code filters --------------------------------------------------------------------

# A reply-code filter: "550", "55x", "4xx" ("*" works like "x").
_BASIC_FILTER = re.compile(r"[2-5xX*][0-9xX*]{2}")
# An enhanced-code filter: "5.1.1", "5.7.*", "4.*.*".
_ENHANCED_FILTER = re.compile(r"[245*]\.(?:\d{1,3}|\*)\.(?:\d{1,3}|\*)")


def _valid_filter(text: str) -> bool:
    return bool(_BASIC_FILTER.fullmatch(text) or _ENHANCED_FILTER.fullmatch(text))


def code_matches(filter_: str, reply: Reply) -> bool:
    """True when ``reply`` matches a code filter such as ``"550"``, ``"4xx"``, ``"5.7.*"``.

    A three-character filter tests the reply code (``x`` or ``*`` matches any digit);
    a dotted filter tests the enhanced code (``*`` matches any number), and never
    matches a reply without one.
    """
    if "." in filter_:
        if reply.enhanced is None:
            return False
        want = filter_.split(".")
        have = reply.enhanced.split(".")
        return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have))
    code = f"{reply.code:03d}"
    return len(code) == len(filter_) and all(w in "xX*" or w == h for w, h in zip(filter_, code))


# -- the rule table ------------------------------------------------------------------


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_category(instance: object, attribute: object, value: str) -> None:
    if value not in CATEGORIES:
        raise ValueError(f"unknown bounce category {value!r}; expected one of {CATEGORIES}")


def _check_codes(instance: object, attribute: object, value: tuple[str, ...]) -> None:
    for code in value:
        if not _valid_filter(code):
            raise ValueError(f'bad code filter {code!r}; expected like "550", "4xx", "5.7.*"')


@frozen
class BounceRule:
    """One row of the bounce table: replies whose text matches ``pattern`` (and whose
    code matches one of ``codes``, when given) get ``category``.

    ``examples`` are raw replies the rule is meant to catch; the test suite checks that
    each of them really ends up in this rule, so the table documents and tests itself.
    """

    category: str = field(validator=_check_category)
    pattern: re.Pattern[str]
    codes: tuple[str, ...] = field(default=(), converter=_str_tuple, validator=_check_codes)
    examples: tuple[str, ...] = field(default=(), converter=_str_tuple)

    def matches(self, reply: Reply) -> bool:
        """True when this rule applies to ``reply``."""
        if self.codes and not any(code_matches(c, reply) for c in self.codes):
            return False
        return self.pattern.search(reply.text) is not None


def _fallback_category(reply: Reply) -> str:
    """The category implied by the codes alone, when no rule matched."""
    if reply.enhanced is not None:
        cls, subject, detail = reply.enhanced.split(".")
        if subject == "1":
            if detail == "2":
                return "bad-domain"
            # 5.1.7 / 5.1.8: our sender address or its domain was refused.
            if detail in ("7", "8"):
                return "spam/policy"
            return "bad-mailbox"
        if subject == "2":
            return {"1": "inactive", "2": "quota", "3": "content"}.get(detail, "other")
        if subject == "3":
            return "content" if detail == "4" else "other"
        if subject == "4":
            return "routing"
        if subject == "5":
            return "protocol"
        if subject == "6":
            return "content"
        if subject == "7":
            return "rate-limit" if cls == "4" else "spam/policy"
        return "other"
    code = reply.code
    if code == 421:
        return "rate-limit"
    if 500 <= code <= 504:
        return "protocol"
    if code == 551:
        return "routing"
    if code == 553:
        return "bad-mailbox"
    return "other"


def _rule_error(key: str, message: str, source: str) -> ConfigError:
    return ConfigError(key, f"{message} (in {source})")


def _string_list(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _rule_error(key, f"expected a string or a list of strings, got {value!r}", source)


_RULE_KEYS = ("category", "pattern", "codes", "examples", "note")


def _parse_rule(i: int, data: Any, source: str) -> BounceRule:
    key = f"rule[{i}]"
    if not isinstance(data, Mapping):
        raise _rule_error(key, "expected a table", source)
    for name in data:
        if name not in _RULE_KEYS:
            raise _rule_error(
                f"{key}.{name}", f"unknown key; expected one of {', '.join(_RULE_KEYS)}", source
            )
    category = data.get("category")
    if category not in CATEGORIES:
        raise _rule_error(
            f"{key}.category",
            f"expected one of {', '.join(CATEGORIES)}, got {category!r}",
            source,
        )
    codes = _string_list(data.get("codes", []), f"{key}.codes", source)
    for j, code in enumerate(codes):
        if not _valid_filter(code):
            raise _rule_error(
                f"{key}.codes[{j}]",
                f'expected a code filter like "550", "4xx", "5.1.1" or "5.7.*", got {code!r}',
                source,
            )
    examples = _string_list(data.get("examples", []), f"{key}.examples", source)
    if "note" in data and not isinstance(data["note"], str):
        raise _rule_error(f"{key}.note", "expected a string", source)
    raw = data.get("pattern")
    if raw is None and not codes:
        raise _rule_error(f"{key}.pattern", "a rule needs a pattern, codes, or both", source)
    if raw is None:
        raw = ""  # codes only: any text
    if not isinstance(raw, str):
        raise _rule_error(f"{key}.pattern", f"expected a string, got {raw!r}", source)
    try:
        pattern = re.compile(raw, re.IGNORECASE)
    except re.error as e:
        raise _rule_error(f"{key}.pattern", f"bad regular expression: {e}", source) from None
    return BounceRule(category=category, pattern=pattern, codes=codes, examples=examples)


class BounceRules:
    """An ordered bounce rule table: the first matching rule names the category;
    without a match the enhanced code (or the reply code) decides."""

    def __init__(self, rules: Iterable[BounceRule] = ()) -> None:
        self._rules: tuple[BounceRule, ...] = tuple(rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[BounceRule]:
        return iter(self._rules)

    def __repr__(self) -> str:
        return f"<BounceRules: {len(self._rules)} rules>"

    def match(self, reply: Reply) -> BounceRule | None:
        """The first rule that applies to ``reply``, or None."""
        for rule in self._rules:
            if rule.matches(reply):
                return rule
        return None

    def categorize(self, reply: Reply) -> str:
        """The bounce category of ``reply`` (one of :data:`CATEGORIES`)."""
        rule = self.match(reply)
        return rule.category if rule is not None else _fallback_category(reply)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<rules>") -> BounceRules:
        """Rules from a parsed TOML document: ``version = 1`` and ``[[rule]]`` tables.

        Raises :class:`~sendarix.config.errors.ConfigError` naming the bad key
        (``rule[3].pattern``) and the source.
        """
        for name in data:
            if name not in ("version", "rule"):
                raise _rule_error(name, "unknown key; expected version and [[rule]]", source)
        version = data.get("version", 1)
        if version != 1:
            raise _rule_error("version", f"unsupported version {version!r}; expected 1", source)
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            raise _rule_error("rule", "expected an array of tables ([[rule]])", source)
        return cls(_parse_rule(i, r, source) for i, r in enumerate(raw_rules))

    @classmethod
    def from_toml(cls, path: str) -> BounceRules:
        """Rules from the TOML file at ``path``."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(path, f"cannot read the bounce rules: {e.strerror or e}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(path, f"invalid TOML: {e}") from None
        return cls.from_mapping(data, source=path)

    @classmethod
    def default(cls) -> BounceRules:
        """The table shipped with Sendarix (loaded once, then shared: rules are immutable)."""
        return _default_rules()


@functools.cache
def _default_rules() -> BounceRules:
    package, name = _DEFAULT_TABLE
    text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
    return BounceRules.from_mapping(tomllib.loads(text), source=f"{package}/{name}")


# -- greylisting, throttling and retry hints ------------------------------------------

# Greylisting wording, also recognised without a table rule so that an operator's own
# table cannot switch greylist detection off by accident.
_GREYLIST = re.compile(r"gr[ae]y[- ]?list", re.IGNORECASE)

# Wording of a sender-wide slow-down request.  "too many recipients" is not one (that is
# a per-message limit), hence the explicit nouns after "too many".
_THROTTLE = re.compile(
    r"rate[- ]?limit|too many (?:connections|messages|mails?|emails|sessions|concurrent"
    r"|simultaneous|smtp|requests|deliveries)|too (?:much mail|fast|quickly|frequent)"
    r"|throttl|slow down|server busy|unusual rate|(?:excessive|unexpected) volume"
    r"|(?:sending|hourly|daily|message|connection) (?:rate|limit|quota)",
    re.IGNORECASE,
)

_UNIT_SECONDS: dict[str, float] = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
}  # fmt: skip

# "try again in 300 seconds", "retry in 5 minutes", "wait 60 sec", "greylisted for 5m".
# The few words between verb and number may not cross a sentence (no "." or ";").
_HINT = re.compile(
    r"\b(?:try(?:\s+again)?|retry|re-?send|come\s+back|wait|gr[ae]y[- ]?listed)\b"
    r"[^\d.;]{0,24}?"
    r"(\d{1,9}(?:\.\d{1,3})?)\s*"
    r"(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)\b",
    re.IGNORECASE,
)
# milter-greylist style: "come back in 00:05:00".
_HINT_CLOCK = re.compile(r"\b(?:in|after)\s+(\d{1,2}):([0-5]\d):([0-5]\d)\b")


def retry_hint(text: str) -> float | None:
    """The delay in seconds a reply asks for ("try again in 5 minutes"), or None."""
    m = _HINT.search(text)
    if m:
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    else:
        c = _HINT_CLOCK.search(text)
        if c is None:
            return None
        seconds = int(c.group(1)) * 3600.0 + int(c.group(2)) * 60.0 + int(c.group(3))
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def classify(
    reply: Reply, rules: BounceRules, soft_codes: Collection[str] = DEFAULT_SOFT_CODES
) -> Classification:
    """The :class:`Classification` of a per-recipient (or per-message) reply.

    ``soft_codes`` are code filters (normally enhanced codes like ``"5.2.2"``) that turn
    a 5xx into a deferral.  Codes outside 2xx/4xx/5xx (a 3xx where a final reply was due)
    are a protocol error on the server's side: deferred, never lost.
    """
    code_class = reply.code // 100
    if code_class == 2:
        return Classification(Verdict.DELIVERED, None)
    category = rules.categorize(reply)
    if code_class == 5:
        if not any(code_matches(c, reply) for c in soft_codes):
            return Classification(Verdict.BOUNCED, category)
        return Classification(Verdict.DEFERRED, category, retry_after=retry_hint(reply.text))
    if code_class != 4:
        return Classification(Verdict.DEFERRED, "protocol")
    # 421 closes the session: it is a throttle signal, never greylisting.
    greylist = reply.code != 421 and (
        category == "greylist" or _GREYLIST.search(reply.text) is not None
    )
    if greylist:
        category = "greylist"
    elif category == "greylist":
        # Only a table rule without a code filter gets here (a 421 with greylist words).
        category = _fallback_category(reply)
    enhanced_policy = reply.enhanced is None or reply.enhanced.startswith("4.7.")
    throttle = reply.code == 421 or (
        not greylist
        and enhanced_policy
        and (category == "rate-limit" or _THROTTLE.search(reply.text) is not None)
    )
    return Classification(
        Verdict.DEFERRED,
        category,
        greylist=greylist,
        retry_after=retry_hint(reply.text),
        throttle=throttle,
    )
