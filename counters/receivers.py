"""What the counter service does when its configuration changes: invalidate caches, forget deleted keys."""

from functools import partial

from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_delete
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


@receiver(pre_delete, sender=Counter)
def counter_deleting(instance, **kwargs) -> None:
    """Lock the counter's row before its rows are deleted (pre_delete runs inside the deletion's
    transaction, before the cascade): a flush in progress holds the row and finishes first, so its
    rows are deleted too; a flush after it finds the counter gone (flush._apply_batch)."""
    list(Counter.objects.filter(pk=instance.pk).select_for_update().values_list("pk"))
