"""Config-change invalidation and the events other code can subscribe to."""

from functools import partial

import django.dispatch
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .models import ApiKey, App, Counter, Threshold

# Sent after the flusher has durably recorded a threshold crossing (argument: event_ids).
threshold_crossed = django.dispatch.Signal()


@receiver([post_save, post_delete], sender=App)
@receiver([post_save, post_delete], sender=Counter)
@receiver([post_save, post_delete], sender=Threshold)
@receiver([post_save, post_delete], sender=ApiKey)
def config_changed(**kwargs) -> None:
    from .config import bump_generation

    bump_generation()


@receiver(post_delete, sender=Counter)
def counter_deleted(instance, **kwargs) -> None:
    from .services import counter_store_forget

    transaction.on_commit(partial(counter_store_forget, counter_id=instance.id))
