import logging

from counters.signals import threshold_crossed

from .services import deliveries_create

logger = logging.getLogger(__name__)


def on_threshold_crossed(sender, *, event_ids: list[int], **kwargs) -> None:
    # Runs inside the flusher: a failure here must not stop the flush. The sweep creates what is missing.
    try:
        deliveries_create(event_ids=event_ids)
    except Exception:
        logger.exception("could not queue deliveries for threshold events %s; the sweep will retry", event_ids)


threshold_crossed.connect(on_threshold_crossed, dispatch_uid="alerts.deliveries_create")
