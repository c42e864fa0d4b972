"""Events other code can subscribe to.

``threshold_alert`` is sent by an "emit an event" action, in the Celery worker that delivers it,
with ``payload`` (see ``alerts.payloads.PLACEHOLDERS``), ``channel_id`` and ``delivery_id``. A
receiver that raises makes the attempt fail, so it is retried like any other delivery.
"""

import django.dispatch

threshold_alert = django.dispatch.Signal()
