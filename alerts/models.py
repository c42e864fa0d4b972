from django.core.exceptions import ValidationError
from django.db import models

from counters.models import App, Counter, Threshold, ThresholdEvent

from .payloads import PayloadTemplateError, check_template


class Channel(models.Model):
    """Where a threshold's alert goes (a channel) or what it does (an action)."""

    class Kind(models.TextChoices):
        EMAIL = "email", "Email"
        SMS = "sms", "SMS"
        MESSAGE = "message", "In-system message"
        WEBHOOK = "webhook", "Webhook (signed JSON POST of the event)"
        ENDPOINT = "endpoint", "Action: call a custom endpoint (payload template)"
        EVENT = "event", "Action: emit an event"
        LOG = "log", "Action: write a special log line"

    threshold = models.ForeignKey(Threshold, on_delete=models.CASCADE, related_name="alert_channels")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    name = models.CharField(max_length=100, blank=True)
    enabled = models.BooleanField(default=True)
    recipients = models.TextField(
        blank=True, help_text="Email: addresses. SMS: phone numbers. One per line or separated by commas."
    )
    url = models.URLField(max_length=500, blank=True, help_text="Webhook / custom endpoint: where to POST.")
    secret = models.CharField(
        max_length=200,
        blank=True,
        help_text="Webhook / endpoint: HMAC-SHA256 key; the receiver checks X-Counter-Signature with it.",
    )
    payload_template = models.JSONField(
        default=dict,
        blank=True,
        help_text='Custom endpoint: the JSON to send; strings may use ${placeholders}, e.g. {"player": "${subject}"}.',
    )
    task_name = models.CharField(
        max_length=200, blank=True, help_text="Emit an event: also send this Celery task (kwarg 'payload')."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["threshold_id", "id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} for {self.threshold}" + (f" ({self.name})" if self.name else "")

    @property
    def recipient_list(self) -> list[str]:
        return [r.strip() for r in self.recipients.replace("\n", ",").split(",") if r.strip()]

    def clean(self) -> None:
        if self.kind in (self.Kind.EMAIL, self.Kind.SMS) and not self.recipient_list:
            raise ValidationError({"recipients": "Give at least one recipient."})
        if self.kind in (self.Kind.WEBHOOK, self.Kind.ENDPOINT):
            if not self.url.startswith(("http://", "https://")):
                raise ValidationError({"url": "An http:// or https:// URL is required."})
            if self.kind == self.Kind.WEBHOOK and not self.secret:
                raise ValidationError({"secret": "Webhooks are signed: give a secret."})
        if self.kind == self.Kind.ENDPOINT:
            try:
                check_template(self.payload_template)
            except PayloadTemplateError as exc:
                raise ValidationError({"payload_template": str(exc)}) from exc


class Delivery(models.Model):
    """One channel's delivery of one threshold event; retried with backoff, each attempt logged."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RETRYING = "retrying", "Waiting to retry"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed (attempts exhausted)"

    event = models.ForeignKey(ThresholdEvent, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    extra_attempts = models.PositiveIntegerField(
        default=0, help_text="Granted by an operator's retry, on top of ALERTS_MAX_ATTEMPTS."
    )
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "deliveries"
        constraints = [models.UniqueConstraint(fields=["event", "channel"], name="delivery_once_per_channel")]

    def __str__(self) -> str:
        return f"delivery {self.pk} ({self.channel.kind}, {self.status})"


class DeliveryAttempt(models.Model):
    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField()
    ok = models.BooleanField()
    status_code = models.PositiveIntegerField(null=True, blank=True, help_text="HTTP status, if any.")
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["delivery_id", "number"]
        constraints = [models.UniqueConstraint(fields=["delivery", "number"], name="attempt_number_per_delivery")]


class Message(models.Model):
    """An in-system message: stored here, listed in the admin and by the API for managers."""

    app = models.ForeignKey(App, on_delete=models.CASCADE, related_name="+")
    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="+")
    event = models.ForeignKey(ThresholdEvent, on_delete=models.CASCADE, related_name="+")
    delivery = models.OneToOneField(Delivery, on_delete=models.CASCADE, related_name="message")
    level = models.CharField(max_length=8, choices=Threshold.Level.choices)
    title = models.CharField(max_length=300)
    body = models.TextField()
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.title
