from celery import shared_task

from .services import deliveries_sweep, delivery_attempt


@shared_task(bind=True, name="alerts.deliver", ignore_result=True, max_retries=None)
def deliver(self, delivery_id: int) -> None:
    # The delivery row counts attempts and bounds them (ALERTS_MAX_ATTEMPTS); the task only waits.
    outcome = delivery_attempt(delivery_id=delivery_id)
    if outcome is not None and outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)


@shared_task(name="alerts.sweep", ignore_result=True)
def sweep() -> int:
    return deliveries_sweep()
