"""Events other code can subscribe to (their receivers live elsewhere: ``counters.receivers``, ``alerts.receivers``)."""

import django.dispatch

# Sent after a threshold crossing is durably recorded, by the flusher or a write-through update
# (argument: event_ids).
threshold_crossed = django.dispatch.Signal()
