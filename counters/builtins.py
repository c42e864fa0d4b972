"""The built-in apps and counters that exist after ``migrate`` (used by the data migration and tests)."""

GLOBAL_APP = {"slug": "global", "name": "Global counters shared by all apps"}
DEFAULT_APP = {"slug": "default", "name": "Default app"}

BUILTIN_COUNTERS = [
    {
        "name": "online_players",
        "display_name": "Players online now",
        "description": "Players with a live lease: login opens it, heartbeats renew it, logout closes it.",
        "unit": "players",
        "period": "none",
        "kind": "presence",
    },
    {
        "name": "daily_active_users",
        "display_name": "Active today",
        "description": "Each user_id counted once per day.",
        "unit": "players",
        "period": "daily",
        "unique_members": True,
    },
    {
        "name": "total_games_played",
        "display_name": "Games played today",
        "description": "+1 per finished game; resets daily.",
        "unit": "games",
        "period": "daily",
    },
]


def ensure_builtins(app_model, counter_model) -> None:
    """Create what is missing; never touch what an operator has changed."""
    app_model.objects.get_or_create(slug=GLOBAL_APP["slug"], defaults={"name": GLOBAL_APP["name"]})
    default, _ = app_model.objects.get_or_create(slug=DEFAULT_APP["slug"], defaults={"name": DEFAULT_APP["name"]})
    # A data migration passes the model as it was then: it may not have every field of a spec yet
    # (0007 makes online_players a presence counter on databases built before the field existed).
    known = {field.name for field in counter_model._meta.get_fields()}
    for spec in BUILTIN_COUNTERS:
        defaults = {key: value for key, value in spec.items() if key in known}
        counter_model.objects.get_or_create(app=default, name=spec["name"], defaults={**defaults, "public": True})
