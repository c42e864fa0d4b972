"""What the counter service does when its configuration changes: invalidate caches, forget deleted keys."""

from functools import partial

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .config import bump_generation
from .flush import counter_store_forget
from .models import ApiKey, App, Counter, Threshold


@receiver([post_save, post_delete], sender=App)
@receiver([post_save, post_delete], sender=Counter)
@receiver([post_save, post_delete], sender=Threshold)
@receiver([post_save, post_delete], sender=ApiKey)
def config_changed(**kwargs) -> None:
    bump_generation()


@receiver(post_delete, sender=Counter)
def counter_deleted(instance, **kwargs) -> None:
    transaction.on_commit(partial(counter_store_forget, counter_id=instance.id))
