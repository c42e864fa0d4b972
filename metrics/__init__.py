"""Prometheus metrics of the service (docs/metrics.md).

``definitions`` holds every metric the processes write; ``recorders`` the small functions the
request path, the flusher, the archive and the alert deliveries call; ``scrape`` what is read from
Redis when Prometheus scrapes; ``views`` serves ``/metrics``.
"""
