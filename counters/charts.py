"""Charts for the admin, drawn on the server as inline SVG: no script, no CDN, works offline."""

from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

from .selectors import HistoryPoint

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 16, 36
MAX_X_LABELS = 8
MAX_BAR_WIDTH = 48


def _number(value: int) -> str:
    return f"{value:,}"


def bar_chart_svg(points: list[HistoryPoint], *, title: str, current_label: str = "") -> SafeString:
    """Bars of each point's value, a tick of its peak, and the point called ``current_label`` highlighted.

    Each bar carries a tooltip with its label, value, peak and number of operations.
    """
    if not points:
        return format_html('<p class="chart-empty">{}: no data yet.</p>', title)
    low = min(0, *(p.value for p in points))
    high = max(1, *(max(p.value, p.peak) for p in points))
    span = high - low
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / len(points)
    bar_w = min(MAX_BAR_WIDTH, max(1.0, step * 0.8))

    def y(value: int) -> float:
        return TOP + plot_h * (high - value) / span

    parts = [
        f'<figure class="counter-chart-figure" style="margin: 0 0 12px;"><figcaption>{escape(title)}</figcaption>',
        f'<svg class="counter-chart" role="img" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{LEFT}" y1="{y(0):.1f}" x2="{WIDTH - RIGHT}" y2="{y(0):.1f}" stroke="#888" />',
        f'<text x="{LEFT - 6}" y="{y(high) + 4:.1f}" text-anchor="end" font-size="11">{_number(high)}</text>',
        f'<text x="{LEFT - 6}" y="{y(low) + 4:.1f}" text-anchor="end" font-size="11">{_number(low)}</text>',
    ]
    label_every = max(1, -(-len(points) // MAX_X_LABELS))
    for i, point in enumerate(points):
        x = LEFT + i * step + (step - bar_w) / 2
        top, base = sorted((y(point.value), y(0)))
        colour = "#d97706" if point.label == current_label else "#417690"
        tip = f"{point.label}: {_number(point.value)} (peak {_number(point.peak)}, {_number(point.operations)} ops)"
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{top:.1f}" width="{bar_w:.1f}" height="{max(base - top, 0.5):.1f}" '
            f'fill="{colour}" data-label="{escape(point.label)}" data-value="{point.value}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if point.peak > point.value:
            parts.append(
                f'<line x1="{x:.1f}" x2="{x + bar_w:.1f}" y1="{y(point.peak):.1f}" y2="{y(point.peak):.1f}" '
                f'stroke="#b91c1c" stroke-width="1.5" />'
            )
        if i % label_every == 0 or i == len(points) - 1:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" '
                f'font-size="10">{escape(point.label)}</text>'
            )
    parts.append("</svg></figure>")
    # Every interpolated label went through escape(); numbers are formatted by us.
    return mark_safe("".join(parts))
