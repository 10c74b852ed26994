"""Charts drawn on the server as inline SVG: stacked bars of counts per interval.

No script and no inline style: colours come from the series' CSS classes
(``series-delivered`` ...) in the dashboard's stylesheet, so the page's content
security policy stays strict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sendarix.control.dashboard.markup import Html, html, join

WIDTH = 720
HEIGHT = 200
#: Room for the axis labels: left, bottom, top.
LEFT, BOTTOM, TOP = 44, 22, 8


def _nice_max(value: int) -> int:
    """The axis top: ``value`` rounded up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= value:
                return step * m
        step *= 10


def stacked_bars(
    title: str, labels: Sequence[str], series: Mapping[str, Sequence[int]],
    label_every: int = 1,
) -> Html:
    """An SVG chart: one bar per label, each series stacked in order (a series name
    is its CSS class suffix); every ``label_every``-th label is written under its bar."""
    n = max(1, len(labels))
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    top = _nice_max(max(totals, default=0))
    plot_w = WIDTH - LEFT - 4
    plot_h = HEIGHT - BOTTOM - TOP
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    parts: list[Html] = []
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - fraction)
        parts.append(html(
            '<line class="grid" x1="$x1" y1="$y" x2="$x2" y2="$y"/>'
            '<text class="axis" x="$tx" y="$ty" text-anchor="end">$v</text>',
            x1=LEFT, x2=WIDTH - 4, y=f"{y:.1f}", tx=LEFT - 4, ty=f"{y + 4:.1f}",
            v=f"{top * fraction:g}",
        ))
    for i, label in enumerate(labels):
        x = LEFT + i * slot + (slot - bar_w) / 2
        y = TOP + plot_h
        for name, values in series.items():
            count = values[i]
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            parts.append(html(
                '<rect class="series-$name" x="$x" y="$y" width="$w" height="$h">'
                "<title>$label: $count $name</title></rect>",
                name=name, x=f"{x:.1f}", y=f"{y:.1f}", w=f"{bar_w:.1f}", h=f"{h:.1f}",
                label=label, count=count,
            ))
        if i % label_every == 0:
            parts.append(html(
                '<text class="axis" x="$x" y="$y" text-anchor="middle">$label</text>',
                x=f"{LEFT + i * slot + slot / 2:.1f}", y=HEIGHT - 6, label=label,
            ))
    legend = join(
        html('<span class="key"><span class="swatch series-$n"></span>$n</span>', n=name)
        for name in series
    )
    return html(
        '<figure class="chart"><figcaption>$title $legend</figcaption>'
        '<svg viewBox="0 0 $w $h" width="100%" role="img" aria-label="$title">'
        "$parts</svg></figure>",
        title=title, legend=legend, w=WIDTH, h=HEIGHT, parts=join(parts),
    )
