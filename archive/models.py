from django.db import models


class PeriodArchive(models.Model):
    """A closed period of a periodic counter: its final value, peak and operations."""

    counter = models.ForeignKey("counters.Counter", on_delete=models.CASCADE, related_name="archives")
    subject = models.CharField(max_length=64, blank=True)
    period = models.CharField(max_length=10)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    time_zone = models.CharField(max_length=64)
    final_value = models.BigIntegerField()
    peak = models.BigIntegerField()
    operations = models.BigIntegerField()
    archived_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-period_start"]
        constraints = [
            models.UniqueConstraint(fields=["counter", "subject", "period"], name="periodarchive_identity"),
        ]


class ResetLog(models.Model):
    """Every reset, automatic or manual: who, when, why, and the value before and after."""

    class Kind(models.TextChoices):
        AUTOMATIC = "automatic", "Automatic (period rollover)"
        MANUAL = "manual", "Manual"

    counter = models.ForeignKey("counters.Counter", on_delete=models.CASCADE, related_name="reset_logs")
    subject = models.CharField(max_length=64, blank=True)
    period = models.CharField(max_length=10, blank=True)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    operator = models.CharField(max_length=150, blank=True)
    reason = models.TextField(blank=True)
    value_before = models.BigIntegerField()
    value_after = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # A period closes once: its automatic reset is logged once per subject, however often
            # (or concurrently) the archive task runs.
            models.UniqueConstraint(
                fields=["counter", "subject", "period"],
                condition=models.Q(kind="automatic"),
                name="resetlog_automatic_once_per_period",
            ),
        ]
