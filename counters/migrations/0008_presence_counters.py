import django.core.validators
from django.db import migrations, models

DESCRIPTION = "Players with a live lease: login opens it, heartbeats renew it, logout closes it."


def online_players_to_presence(apps, schema_editor):
    # Only the built-in counter of the default app; an app's own online_players stays as configured.
    Counter = apps.get_model("counters", "Counter")
    Counter.objects.filter(app__slug="default", name="online_players").update(kind="presence", description=DESCRIPTION)


def online_players_to_plain(apps, schema_editor):
    Counter = apps.get_model("counters", "Counter")
    Counter.objects.filter(app__slug="default", name="online_players").update(kind="plain")


class Migration(migrations.Migration):
    dependencies = [("counters", "0007_countervalue_version")]

    operations = [
        migrations.AddField(
            model_name="counter",
            name="kind",
            field=models.CharField(
                choices=[
                    ("plain", "Plain (increments and decrements)"),
                    ("presence", "Presence (live leases: login, heartbeat, logout)"),
                ],
                default="plain",
                help_text="Presence: the value is the number of live leases (docs/presence.md).",
                max_length=10,
            ),
        ),
        migrations.AddField(
            model_name="counter",
            name="lease_seconds",
            field=models.PositiveIntegerField(
                default=90,
                help_text="Presence: a login or heartbeat keeps a player counted this long.",
                validators=[
                    django.core.validators.MinValueValidator(5),
                    django.core.validators.MaxValueValidator(3600),
                ],
            ),
        ),
        migrations.AddField(
            model_name="counter",
            name="presence_counts",
            field=models.CharField(
                choices=[
                    ("users", "Users (several sessions of one user count once)"),
                    ("sessions", "Sessions (each session counts)"),
                ],
                default="users",
                help_text="Presence: what counts.",
                max_length=8,
            ),
        ),
        migrations.RunPython(online_players_to_presence, online_players_to_plain),
    ]
