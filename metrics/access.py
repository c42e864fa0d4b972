"""The /metrics settings, checked at start-up: a typo must stop the start, not open or hide metrics."""

import ipaddress

from django.core.exceptions import ImproperlyConfigured

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks_parsed(raw: list[str]) -> list[IpNetwork]:
    try:
        return [ipaddress.ip_network(entry.strip(), strict=False) for entry in raw if entry.strip()]
    except ValueError as exc:
        raise ImproperlyConfigured(f"METRICS_ALLOWED_NETWORKS: {exc}") from exc


def exported_counters_parsed(raw: list[str]) -> list[tuple[str, str]]:
    """``app/name`` or ``app/*`` entries as (app slug, name or '*')."""
    parsed = []
    for entry in (e.strip() for e in raw if e.strip()):
        app, _, name = entry.partition("/")
        if not app or not name or "/" in name:
            raise ImproperlyConfigured(f"METRICS_COUNTERS: {entry!r} is not 'app/name' or 'app/*'.")
        parsed.append((app, name))
    return parsed
