import hashlib
import secrets
import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
name_validator = RegexValidator(NAME_PATTERN, "Use 1-64 letters, digits, '_', '.', ':' or '-'.")


def validate_time_zone(value: str) -> None:
    if value and value not in zoneinfo.available_timezones():
        raise ValidationError(f"Unknown time zone {value!r}.")


class App(models.Model):
    """A tenant: a game (or any client) whose counters are isolated from every other app's."""

    slug = models.CharField(max_length=64, unique=True, validators=[name_validator])
    name = models.CharField(max_length=200, blank=True)
    time_zone = models.CharField(
        max_length=64,
        blank=True,
        validators=[validate_time_zone],
        help_text="Time zone of this app's periodic counters; empty means the service default.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def effective_time_zone(self) -> str:
        return self.time_zone or settings.COUNTER_DEFAULT_TIME_ZONE


class Counter(models.Model):
    class Scope(models.TextChoices):
        GLOBAL = "global", "Global (shared by all apps)"
        APP = "app", "App"
        USER = "user", "User (one value per player)"

    class Period(models.TextChoices):
        NONE = "none", "Never resets"
        DAILY = "daily", "Daily (00:00)"
        WEEKLY = "weekly", "Weekly (Monday 00:00)"
        MONTHLY = "monthly", "Monthly (1st 00:00)"

    class ResetStrategy(models.TextChoices):
        VALUE = "value", "Reset to a value"
        KEEP = "keep", "Keep the value"
        RATIO = "ratio", "Relative: multiply by a ratio"
        DIFFERENCE = "difference", "Relative: subtract a difference"

    class Kind(models.TextChoices):
        PLAIN = "plain", "Plain (increments and decrements)"
        PRESENCE = "presence", "Presence (live leases: login, heartbeat, logout)"

    class PresenceCounts(models.TextChoices):
        USERS = "users", "Users (several sessions of one user count once)"
        SESSIONS = "sessions", "Sessions (each session counts)"

    # Lease bounds of presence counters (a heartbeat may ask for its own lease within them).
    MIN_LEASE_SECONDS = 5
    MAX_LEASE_SECONDS = 3600
    # A split counter's shard count (docs/splitting.md): a read sums this many keys.
    MAX_SHARDS = 64

    app = models.ForeignKey(App, on_delete=models.PROTECT, related_name="counters")
    name = models.CharField(max_length=64, validators=[name_validator])
    display_name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    unit = models.CharField(max_length=32, blank=True)
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.APP)
    period = models.CharField(max_length=8, choices=Period.choices, default=Period.NONE)
    time_zone = models.CharField(
        max_length=64,
        blank=True,
        validators=[validate_time_zone],
        help_text="Overrides the app's time zone for this counter's periods.",
    )
    reset_strategy = models.CharField(max_length=12, choices=ResetStrategy.choices, default=ResetStrategy.VALUE)
    reset_value = models.BigIntegerField(default=0, help_text="Opening value of a period (strategy 'value').")
    reset_ratio = models.DecimalField(
        max_digits=8, decimal_places=4, default=1, help_text="Strategy 'ratio': opening = floor(previous * ratio)."
    )
    reset_difference = models.BigIntegerField(default=0, help_text="Strategy 'difference': opening = previous - this.")
    min_value = models.BigIntegerField(default=0, help_text="Lowest value unless negatives are allowed.")
    max_value = models.BigIntegerField(null=True, blank=True)
    allow_negative = models.BooleanField(default=False)
    saturate = models.BooleanField(default=False, help_text="Clamp at max_value instead of refusing the update.")
    unique_members = models.BooleanField(
        default=False, help_text="Count each user_id once per period (e.g. daily active users)."
    )
    public = models.BooleanField(default=False, help_text="Readable without an API key.")
    log_operations = models.BooleanField(default=False, help_text="Keep every update in the operation log.")
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Temporary counters stop accepting updates.")
    kind = models.CharField(
        max_length=10,
        choices=Kind.choices,
        default=Kind.PLAIN,
        help_text="Presence: the value is the number of live leases (docs/presence.md).",
    )
    lease_seconds = models.PositiveIntegerField(
        default=90,
        validators=[MinValueValidator(MIN_LEASE_SECONDS), MaxValueValidator(MAX_LEASE_SECONDS)],
        help_text="Presence: a login or heartbeat keeps a player counted this long.",
    )
    presence_counts = models.CharField(
        max_length=8, choices=PresenceCounts.choices, default=PresenceCounts.USERS, help_text="Presence: what counts."
    )
    shards = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_SHARDS)],
        help_text="Split a very hot counter over this many Redis keys (in a Redis Cluster: other nodes); reads "
        "sum them. Can grow, never shrink. Not for presence counters, max_value, the operation log or a "
        "reset strategy other than 'value' (docs/splitting.md).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["app__slug", "name"]
        constraints = [models.UniqueConstraint(fields=["app", "name"], name="counter_unique_name_per_app")]
        # Apart from change_counter: editing config and resetting values are different jobs.
        permissions = [("reset_counter", "Can reset counter values")]

    def __str__(self) -> str:
        return f"{self.app.slug}/{self.name}"

    def clean(self) -> None:
        if self.unique_members and self.scope == self.Scope.USER:
            raise ValidationError("Unique-member counting applies to app and global counters, not user counters.")
        if self.max_value is not None and not self.allow_negative and self.max_value < self.min_value:
            raise ValidationError("max_value must not be below min_value.")
        if self.kind == self.Kind.PRESENCE and (self.scope == self.Scope.USER or self.unique_members):
            raise ValidationError("A presence counter counts an app's players: not per player, not unique-member.")
        self._clean_shards()

    def _clean_shards(self) -> None:
        """What a split counter cannot keep exactly is refused (docs/splitting.md)."""
        before = Counter.objects.filter(pk=self.pk).values_list("shards", "unique_members").first() if self.pk else None
        if before and self.shards < before[0]:
            raise ValidationError(
                {"shards": f"A counter's shards can grow, never shrink: it is split over {before[0]}."}
            )
        if before and self.shards != before[0] and (self.unique_members or before[1]):
            raise ValidationError(
                {
                    "shards": "A unique-member counter keeps the shard count it was created with: each member "
                    "is counted in the shard its name chooses, so another count would count members again."
                }
            )
        if self.shards <= 1:
            return
        refused = []
        if self.kind == self.Kind.PRESENCE:
            refused.append("a presence counter (its leases live under one key)")
        if self.max_value is not None:
            refused.append("max_value (each shard would check only its own share)")
        if self.log_operations:
            refused.append("the operation log (an entry's old and new value would be one shard's)")
        if self.reset_strategy != self.ResetStrategy.VALUE and self.period != self.Period.NONE:
            refused.append(f"the reset strategy '{self.reset_strategy}' (it needs the closed period's total)")
        if refused:
            raise ValidationError({"shards": "A split counter cannot have " + "; ".join(refused) + "."})

    @property
    def effective_time_zone(self) -> str:
        return self.time_zone or self.app.effective_time_zone


class CounterValue(models.Model):
    """The durable value of (counter, subject, period); Redis holds it hot, the flusher writes it here."""

    # No index of its own: the unique constraint below starts with counter_id and serves lookups by counter.
    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="values", db_index=False)
    subject = models.CharField(max_length=64, blank=True, help_text="Player id for user counters, else empty.")
    period = models.CharField(max_length=10, blank=True, help_text="Period start (YYYY-MM-DD), empty if none.")
    value = models.BigIntegerField(default=0)
    peak = models.BigIntegerField(default=0)
    operations = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(null=True, blank=True)
    version = models.BigIntegerField(
        default=0,
        help_text="How many flushes of this value were applied; a flush applies only on top of the version it "
        "was taken from, so a Redis restored from an older snapshot can never apply a delta twice.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["counter", "subject", "period"], name="countervalue_identity"),
        ]

    def __str__(self) -> str:
        return f"{self.counter_id}:{self.subject}:{self.period}={self.value}"


class CounterValueShard(models.Model):
    """What one shard k > 0 of a split counter's value has added (``docs/splitting.md``).

    ``CounterValue`` holds the value's total: a flush of shard k adds its delta there and here in one
    transaction, with this row's version guarding it the way ``CounterValue.version`` guards shard 0.
    So shard 0's share is always the total minus these rows, and a lost shard hydrates from its row.
    """

    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="+", db_index=False)
    subject = models.CharField(max_length=64, blank=True)
    period = models.CharField(max_length=10, blank=True)
    shard = models.PositiveSmallIntegerField()
    value = models.BigIntegerField(default=0)
    operations = models.BigIntegerField(default=0)
    version = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["counter", "subject", "period", "shard"], name="countervalueshard_identity"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.counter_id}:{self.subject}:{self.period}#{self.shard}={self.value}"


class UniqueMember(models.Model):
    """A user already counted in a period of a unique-member counter."""

    # No index of its own: the unique constraint below starts with counter_id and serves lookups by counter.
    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="+", db_index=False)
    period = models.CharField(max_length=10, blank=True)
    member = models.CharField(max_length=64)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["counter", "period", "member"], name="uniquemember_identity"),
        ]


class StatBucket(models.Model):
    """Per-minute activity of a counter, recorded on the hot path and flushed with the deltas."""

    # No index of its own: the unique constraint below starts with counter_id and serves lookups by counter.
    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="+", db_index=False)
    minute = models.DateTimeField()
    operations = models.BigIntegerField(default=0)
    delta = models.BigIntegerField(default=0)
    last_value = models.BigIntegerField(null=True)
    max_value = models.BigIntegerField(null=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["counter", "minute"], name="statbucket_identity")]


class OperationLog(models.Model):
    """One update of a counter whose config asks for an operation log; written in batches by the flusher."""

    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=64, blank=True)
    period = models.CharField(max_length=10, blank=True)
    actor = models.CharField(max_length=100, blank=True)
    user_id = models.CharField(max_length=64, blank=True)
    old_value = models.BigIntegerField()
    new_value = models.BigIntegerField()
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class FlushedBatch(models.Model):
    """A batch of deltas already applied: recorded in the same transaction, so a re-run skips it."""

    id = models.CharField(max_length=40, primary_key=True, help_text="Time-ordered: <ns>-<random>.")
    counter_id = models.BigIntegerField()
    applied_at = models.DateTimeField(auto_now_add=True, db_index=True)


class Threshold(models.Model):
    class Direction(models.TextChoices):
        UP = "up", "Rising to or above"
        DOWN = "down", "Falling to or below"

    class Level(models.TextChoices):
        INFO = "info", "Info"
        WARNING = "warning", "Warning"
        CRITICAL = "critical", "Critical"

    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="thresholds")
    value = models.BigIntegerField()
    direction = models.CharField(max_length=4, choices=Direction.choices, default=Direction.UP)
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    enabled = models.BooleanField(default=True)
    cooldown_seconds = models.PositiveIntegerField(
        default=0, help_text="After firing, stay quiet this long even if the threshold is crossed again."
    )
    rearm = models.BooleanField(
        default=False,
        help_text="Fire again in the same period once the counter has fallen back past the value "
        "(below it for 'up', above it for 'down'). Off: at most once per period.",
    )

    class Meta:
        ordering = ["counter_id", "value"]

    def __str__(self) -> str:
        return f"{self.counter} {self.direction} {self.value}"


def hash_api_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


class ApiKey(models.Model):
    class Role(models.TextChoices):
        WRITE = "write", "Write (increment / decrement)"
        COUNTER_MANAGE = "counter_manage", "Manage (reset, configure)"
        DATA_VIEW = "data_view", "View (read private counters, statistics)"
        GLOBAL_ADMIN = "global_admin", "Global admin (write global counters)"

    ROLE_ALIASES = {"manage": Role.COUNTER_MANAGE, "view": Role.DATA_VIEW, "global": Role.GLOBAL_ADMIN}

    app = models.ForeignKey(App, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    roles = models.JSONField(default=list)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["app__slug", "prefix"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.app.slug}:{self.prefix}… ({self.name or ', '.join(self.roles)})"

    @classmethod
    def generate(cls, *, app: App, roles: list[str], name: str = "") -> tuple["ApiKey", str]:
        raw = "ck_" + secrets.token_urlsafe(32)
        key = cls.objects.create(app=app, name=name, prefix=raw[:11], key_hash=hash_api_key(raw), roles=roles)
        return key, raw


class ThresholdEvent(models.Model):
    """A threshold crossed in a period: once per (threshold, subject, period) unless it re-arms."""

    threshold = models.ForeignKey(Threshold, on_delete=models.CASCADE, related_name="events")
    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=64, blank=True)
    period = models.CharField(max_length=10, blank=True)
    triggered_at = models.DateTimeField()

    class Meta:
        ordering = ["-triggered_at"]
        constraints = [
            # A re-armed threshold may fire again in a period; a re-applied batch never doubles one.
            models.UniqueConstraint(
                fields=["threshold", "subject", "period", "triggered_at"], name="thresholdevent_once_per_firing"
            ),
        ]


class WrittenThroughValue(models.Model):
    """A value updated straight in PostgreSQL while Redis was down (write-through mode).

    A Redis that comes back with its old data is stale for these values until
    ``counters.write_through.store_reconcile`` has corrected it; ``writes`` lets it forget a mark only
    if no write-through came in meanwhile.
    """

    counter = models.ForeignKey(Counter, on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=64, blank=True)
    period = models.CharField(max_length=10, blank=True)
    writes = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["counter", "subject", "period"], name="writtenthrough_identity"),
        ]
