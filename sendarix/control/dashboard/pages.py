"""The dashboard's pages as HTML, from values already read (no I/O here).

Each function returns the ``body`` of the layout (:mod:`.markup` escapes every value
that is not markup); forms that change something carry the session's token.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from sendarix.control.dashboard.charts import stacked_bars
from sendarix.control.dashboard.figures import (
    DAY,
    HOUR,
    INTAKE,
    OUTCOMES,
    DomainAge,
    ProviderRates,
    Series,
    duration,
    percent,
)
from sendarix.control.dashboard.markup import Html, html, join, table
from sendarix.model.event import EVENT_TYPES, Event
from sendarix.model.message import QueueStats
from sendarix.model.suppression import Suppression

#: How long the suspend form may suspend a destination for (seconds, label).
SUSPEND_CHOICES: tuple[tuple[int, str], ...] = (
    (900, "15 minutes"), (3600, "1 hour"), (4 * 3600, "4 hours"), (86400, "1 day"),
)  # fmt: skip
#: The search fields of the events page, with their labels.
SEARCH_FIELDS: tuple[tuple[str, str], ...] = (
    ("recipient", "Recipient"), ("sender", "Sender"), ("queue_id", "Queue id"),
    ("message_id", "Message-ID"),
)  # fmt: skip


def when(timestamp: float | None) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS`` UTC (empty for None)."""
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S"
    )


def status(value: Any) -> Html:
    text = str(value)
    return html('<span class="status status-$v">$v</span>', v=text)


def csrf_field(token: str) -> Html:
    return html('<input type="hidden" name="csrf" value="$t">', t=token)


def button_form(
    action: str, label: str, token: str, fields: Mapping[str, str] | None = None,
    css: str = "", element_id: str | None = None,
) -> Html:
    """A one-button POST form (its hidden fields and the session's token)."""
    hidden = join(
        html('<input type="hidden" name="$k" value="$v">', k=k, v=v)
        for k, v in (fields or {}).items()
    )
    ident = html(' id="$i"', i=element_id) if element_id else Html("")
    return html(
        '<form method="post" action="$a" class="inline">$csrf$hidden'
        '<button type="submit" class="$css"$ident>$label</button></form>',
        a=action, csrf=csrf_field(token), hidden=hidden, css=css, ident=ident, label=label,
    )


def message_link(queue_id: str | None) -> Html:
    if not queue_id:
        return Html("")
    return html('<a class="mono" href="/messages/$q">$t</a>', q=quote(queue_id, safe=""),
                t=queue_id)


def reply_text(reply: Mapping[str, Any] | None) -> str:
    if not reply:
        return ""
    parts = [str(reply.get("code", "")), str(reply.get("enhanced") or ""),
             str(reply.get("text", ""))]
    return " ".join(p for p in parts if p)


def events_table(events: Sequence[Event], table_id: str = "events") -> Html:
    rows = []
    for event in events:
        response = event.response.to_dict() if event.response is not None else None
        rows.append([
            when(event.timestamp), status(event.type), message_link(event.queue_id),
            event.recipient or ", ".join(event.all_recipients()), event.sender or "",
            event.provider or "", reply_text(response),
        ])
    inner = table(
        ["time (UTC)", "event", "queue id", "recipient", "sender", "provider", "reply"],
        rows, "no events",
    )
    return html('<div id="$i">$t</div>', i=table_id, t=inner)


def search_form(values: Mapping[str, str | None]) -> Html:
    inputs = [
        html('<label>$label<input type="search" name="$n" id="search-$n" value="$v"></label>',
             label=label, n=name, v=values.get(name) or "")
        for name, label in SEARCH_FIELDS
    ]
    chosen = values.get("type") or ""
    options = join(
        html('<option value="$t"$sel>$l</option>', t=t, l=t or "any",
             sel=Html(" selected") if t == chosen else Html(""))
        for t in ("", *EVENT_TYPES)
    )
    return html(
        '<form method="get" action="/events" class="search" id="search-form">$inputs'
        '<label>Type<select name="type" id="search-type">$options</select></label>'
        '<button type="submit" id="search">Search</button></form>',
        inputs=join(inputs), options=options,
    )


def queue_section(stats: QueueStats | None, ages: Sequence[DomainAge]) -> Html:
    if stats is None:
        return Html("")
    by_status = {"pending": 0, "deferred": 0, **stats.by_status}
    cards = [("messages", stats.messages), *sorted(by_status.items())]
    shown = join(
        html('<div class="card" id="depth-$l"><div class="value">$v</div>'
             '<div class="label">$l</div></div>', l=label, v=value)
        for label, value in cards
    )
    by_domain = table(
        ["domain", "waiting recipients", "oldest"],
        [[a.domain, a.waiting, duration(a.oldest)] for a in ages],
        "nothing waiting",
    )
    return html(
        '<h2>Queue</h2><div class="cards">$cards</div>'
        "<h2>Waiting by destination domain</h2>$domains",
        cards=shown, domains=by_domain,
    )


def charts_section(hour: Series, day: Series, partial: bool) -> Html:
    charts = [
        stacked_bars(f"Throughput, {HOUR.name}", hour.labels, hour.pick(INTAKE)),
        stacked_bars(f"Outcomes, {HOUR.name}", hour.labels, hour.pick(OUTCOMES)),
        stacked_bars(f"Throughput, {DAY.name}", day.labels, day.pick(INTAKE), label_every=3),
        stacked_bars(f"Outcomes, {DAY.name}", day.labels, day.pick(OUTCOMES), label_every=3),
    ]
    note = Html('<p class="note">Counted from the newest events only: the day had more '
                "than the dashboard reads.</p>") if partial else Html("")
    return html('<h2>Traffic</h2><div class="grid">$c</div>$n', c=join(charts), n=note)


def rates_section(rates: Sequence[ProviderRates]) -> Html:
    rows = [
        [r.provider, r.delivered, r.deferred, r.bounced, percent(r.deferral_rate),
         percent(r.bounce_rate)]
        for r in rates
    ]
    return html(
        "<h2>Providers, last day</h2>$t",
        t=table(["provider", "delivered", "deferred", "bounced", "deferral rate",
                 "bounce rate"], rows, "no delivery attempts"),
    )


def sites_section(state: Mapping[str, Any] | None, now: float, token: str) -> Html:
    if state is None:
        return Html("")
    rows = []
    for site in state.get("sites", []):
        name = str(site.get("site", ""))
        held = site.get("held_until")
        paused = site.get("suspended_until")
        condition: list[Html] = []
        if held is not None:
            condition.append(html("$s for $d", s=status("suspended"),
                                  d=duration(max(0.0, held - now))))
        if paused is not None:
            condition.append(html("paused after 421s for $d", d=duration(max(0.0, paused - now))))
        action = (
            button_form("/sites/resume", "Resume", token, {"site": name}, "quiet",
                        f"resume-{name}")
            if held is not None else
            button_form("/sites/suspend", "Suspend 1 h", token,
                        {"site": name, "for": "3600"}, "quiet", f"suspend-{name}")
        )
        rate = site.get("rate")
        rows.append([
            html('<span class="mono">$s</span>', s=name),
            f"{site.get('open', 0)}/{site.get('max_connections', '')}",
            site.get("window", ""), site.get("queued", 0),
            "-" if rate is None else f"{rate:g}/{site.get('period', 60):g}s",
            site.get("throttled", 0), join(condition, " ") or "active", action,
        ])
    choices = join(
        html('<option value="$s">$l</option>', s=seconds, l=label)
        for seconds, label in SUSPEND_CHOICES
    )
    form = html(
        '<form method="post" action="/sites/suspend" class="bar" id="suspend-form">$csrf'
        '<label>Destination (provider, mx:… or pool:…)'
        '<input name="site" id="suspend-site" required maxlength="255"></label>'
        '<label>For<select name="for" id="suspend-for">$choices</select></label>'
        '<button type="submit" class="danger" id="suspend">Suspend</button></form>',
        csrf=csrf_field(token), choices=choices,
    )
    sites = table(
        ["destination", "connections", "window", "ready queue", "rate", "throttled",
         "state", ""], rows, "no destination seen yet",
    )
    pools = [
        [pool, html('<span class="mono">$e</span>', e=endpoint), status(health)]
        for pool, endpoints in sorted(state.get("pools", {}).items())
        for endpoint, health in sorted(endpoints.items())
    ]
    egress = [
        [source.get("name"), source.get("address"), source.get("tier"), source.get("pool"),
         "-" if source.get("warmup_cap") is None else source.get("warmup_cap"),
         ", ".join(f"{k} {v}" for k, v in sorted(source.get("sent_today", {}).items())),
         ", ".join(f"{k} ({v:.2f})" for k, v in sorted(source.get("penalties", {}).items()))
         or "none"]
        for source in state.get("egress", [])
    ]
    return html(
        '<h2>Destinations</h2><div id="sites">$sites</div>$form'
        "<h2>Smarthost endpoints</h2>$pools<h2>Egress sources</h2>$egress",
        sites=sites, form=form,
        pools=table(["pool", "endpoint", "health"], pools, "no smarthost pools"),
        egress=table(["source", "address", "tier", "pool", "warmup cap/day", "sent today",
                      "deprioritized for"], egress, "no egress sources: the system's address"),
    )


def overview(
    *, queue: Html, charts: Html, rates: Html, sites: Html, recent: Sequence[Event],
) -> Html:
    return html(
        "$queue$charts$rates$sites<h2>Recent events</h2>$search$events"
        '<p><a href="/events">All events</a></p>',
        queue=queue, charts=charts, rates=rates, sites=sites, search=search_form({}),
        events=events_table(recent, "recent-events"),
    )


def events_page(
    values: Mapping[str, str | None], events: Sequence[Event], next_cursor: str | None,
) -> Html:
    more = Html("")
    if next_cursor is not None:
        args = {k: v for k, v in values.items() if v}
        args["cursor"] = next_cursor
        more = html('<p><a href="/events?$q" id="older">Older events</a></p>',
                    q=urlencode(args))
    return html("$form$events$more", form=search_form(values), events=events_table(events),
                more=more)


def message_page(status_json: Mapping[str, Any], queued: bool, token: str) -> Html:
    queue_id = str(status_json.get("id", ""))
    facts = [
        ("queue id", html('<span class="mono">$q</span>', q=queue_id)),
        ("Message-ID", status_json.get("message_id")), ("tenant", status_json.get("tenant")),
        ("sender", status_json.get("sender")), ("received", status_json.get("received_at")),
        ("tags", ", ".join(status_json.get("tags") or [])),
        ("in the queue", "yes" if queued else "no"),
    ]
    dl = join(html("<dt>$k</dt><dd>$v</dd>", k=k, v=v) for k, v in facts if v not in (None, ""))
    recipients = table(
        ["recipient", "status", "attempts", "next attempt", "last reply"],
        [[r.get("address"), status(r.get("status")), r.get("attempts", 0),
          r.get("next_attempt") or "", reply_text(r.get("last_response"))]
         for r in status_json.get("recipients", [])],
    )
    timeline = table(
        ["time", "event", "recipient", "attempt", "mx", "reply"],
        [[e.get("timestamp"), status(e.get("type")),
          e.get("recipient") or ", ".join(e.get("recipients") or []), e.get("attempt") or "",
          e.get("mx") or "", reply_text(e.get("response"))]
         for e in status_json.get("events", [])],
        "no events yet",
    )
    actions = Html("")
    if queued:
        path = "/messages/" + quote(queue_id, safe="")
        actions = html(
            '<h2>Actions</h2><p>$retry $delete</p>',
            retry=button_form(path + "/retry", "Retry now", token, element_id="retry"),
            delete=button_form(path + "/delete", "Delete from the queue", token,
                               css="danger", element_id="delete"),
        )
    return html(
        '<dl class="facts">$dl</dl><h2>Recipients</h2>$recipients'
        '<h2>Timeline</h2><div id="timeline">$timeline</div>$actions',
        dl=dl, recipients=recipients, timeline=timeline, actions=actions,
    )


def suppressions_page(
    entries: Sequence[Suppression], token: str, operator: bool, next_page: str | None,
) -> Html:
    rows = [
        [e.tenant, e.address, e.reason, e.source, when(e.created_at),
         button_form("/suppressions/remove", "Remove", token,
                     {"address": e.address, "tenant": e.tenant}, "quiet")]
        for e in entries
    ]
    tenant_input = Html(
        '<label>Tenant<input name="tenant" id="remove-tenant" required></label>'
    ) if operator else Html("")
    form = html(
        '<form method="post" action="/suppressions/remove" class="bar" id="remove-form">$csrf'
        '<label>Address<input type="email" name="address" id="remove-address" required>'
        "</label>$tenant<button type=\"submit\" class=\"danger\">Remove</button></form>",
        csrf=csrf_field(token), tenant=tenant_input,
    )
    more = html('<p><a href="/suppressions?cursor=$c">More</a></p>', c=next_page) \
        if next_page else Html("")
    return html("$form$table$more", form=form,
                table=table(["tenant", "address", "reason", "source", "added (UTC)", ""], rows,
                            "no suppressions"),
                more=more)


def flash(message: str | None) -> Html:
    return html('<p class="flash" id="flash">$m</p>', m=message) if message else Html("")

