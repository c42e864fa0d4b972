"""Who may do what in the console: view, edit config and reset are separate permissions."""

import pytest
from django.contrib.auth.models import Permission, User
from django.forms.models import model_to_dict
from django.test import Client

from archive.models import PeriodArchive, ResetLog
from counters import clock
from counters.models import ApiKey, App, Counter, OperationLog, Threshold, ThresholdEvent, hash_api_key
from counters.selectors import counter_config_get, counter_value_get
from counters.services import counter_update

pytestmark = pytest.mark.usefixtures("midday")  # daily counters on a pinned clock

CHANGELIST = "/admin/counters/counter/"
RESET = "/admin/counters/counter/reset/"


def staff(username: str, *codenames: str) -> Client:
    user = User.objects.create_user(username, password="pw-123456", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def counter_named(name: str) -> Counter:
    return Counter.objects.get(app__slug="default", name=name)


def bump(counter: Counter, amount: int, subject: str = "") -> None:
    counter_update(counter=counter_config_get(counter_id=counter.pk), amount=amount, subject=subject)


def live(counter: Counter, subject: str = "") -> int:
    return counter_value_get(counter=counter_config_get(counter_id=counter.pk), subject=subject).value


@pytest.fixture
def online(builtins) -> Counter:
    counter = counter_named("matches_running")
    bump(counter, 7)
    return counter


@pytest.mark.django_db
def test_operator_without_reset_permission_cannot_reset(online):
    editor = staff("editor", "view_counter", "change_counter")
    page = editor.get(CHANGELIST)
    assert page.status_code == 200
    assert b"matches_running" in page.content
    assert b"reset_counters" not in page.content

    forged_action = editor.post(CHANGELIST, {"action": "reset_counters", "_selected_action": [online.pk]})
    assert forged_action.status_code in (200, 302)
    assert editor.get(RESET, {"ids": online.pk}).status_code == 403
    forged_form = editor.post(RESET, {"ids": str(online.pk), "reason": "forged", "value": "0"})
    assert forged_form.status_code == 403

    assert live(online) == 7
    assert not ResetLog.objects.exists()
    assert b'class="reset-link"' not in editor.get(f"{CHANGELIST}{online.pk}/change/").content


@pytest.mark.django_db
def test_reset_permission_alone_resets_with_an_audit_record_but_cannot_edit_config(online):
    resetter = staff("rita", "view_counter", "reset_counter")
    page = resetter.get(CHANGELIST)
    assert b'value="reset_counters"' in page.content
    assert b'class="reset-link"' in resetter.get(f"{CHANGELIST}{online.pk}/change/").content

    chosen = resetter.post(CHANGELIST, {"action": "reset_counters", "_selected_action": [online.pk]})
    assert chosen.status_code == 302 and chosen["Location"].startswith(RESET)
    confirm = resetter.get(chosen["Location"])
    assert confirm.status_code == 200
    assert b"default/matches_running" in confirm.content and b'class="current-value">7<' in confirm.content

    no_reason = resetter.post(RESET, {"ids": str(online.pk), "reason": "   ", "value": "0"})
    assert no_reason.status_code == 200 and b"Say why the counter is reset." in no_reason.content
    assert live(online) == 7 and not ResetLog.objects.exists()

    done = resetter.post(RESET, {"ids": str(online.pk), "reason": "server restart", "value": "2"}, follow=True)
    assert b"reset from 7 to 2" in done.content
    assert live(online) == 2
    log = ResetLog.objects.get()
    assert (log.operator, log.reason, log.value_before, log.value_after) == ("rita", "server restart", 7, 2)

    edit = resetter.post(f"{CHANGELIST}{online.pk}/change/", {"name": "renamed"})
    assert edit.status_code == 403
    assert counter_named("matches_running").name == "matches_running"


@pytest.mark.django_db
def test_reset_outside_the_bounds_changes_nothing_and_says_why(online):
    resetter = staff("rita", "view_counter", "reset_counter")
    done = resetter.post(RESET, {"ids": str(online.pk), "reason": "oops", "value": "-5"}, follow=True)
    assert b"not reset: A reset value must lie between 0 and" in done.content
    assert live(online) == 7 and not ResetLog.objects.exists()


@pytest.mark.django_db
def test_batch_reset_and_per_player_counter_needs_a_player_id(builtins):
    app = App.objects.get(slug="default")
    score = Counter.objects.create(app=app, name="event_score", scope=Counter.Scope.USER)
    games = counter_named("total_games_played")
    bump(games, 4)
    bump(score, 9, subject="p1")
    bump(score, 5, subject="p2")
    resetter = staff("rita", "view_counter", "reset_counter")
    ids = f"{games.pk},{score.pk}"

    confirm = resetter.get(RESET, {"ids": ids})
    assert b"per player" in confirm.content and b'name="player_id"' in confirm.content
    missing = resetter.post(RESET, {"ids": ids, "reason": "event rerun", "value": "0"})
    assert b"A per-player counter is reset for one player" in missing.content
    assert live(games) == 4

    resetter.post(RESET, {"ids": ids, "reason": "event rerun", "value": "0", "player_id": "p1"})
    assert (live(games), live(score, "p1"), live(score, "p2")) == (0, 0, 5)
    logs = {(r.counter_id, r.subject): (r.value_before, r.reason) for r in ResetLog.objects.all()}
    assert logs == {(games.pk, ""): (4, "event rerun"), (score.pk, "p1"): (9, "event rerun")}


@pytest.mark.django_db
def test_audit_records_are_read_only(online):
    now = clock.now()
    threshold = Threshold.objects.create(counter=online, value=5)
    records = {
        "archive/resetlog": ResetLog.objects.create(
            counter=online, kind="manual", operator="rita", reason="x", value_before=7, value_after=0
        ),
        "archive/periodarchive": PeriodArchive.objects.create(
            counter=online, period="2026-01-01", period_start=now, period_end=now, time_zone="UTC",
            final_value=3, peak=4, operations=5,
        ),
        "counters/operationlog": OperationLog.objects.create(counter=online, old_value=0, new_value=7, created_at=now),
        "counters/thresholdevent": ThresholdEvent.objects.create(threshold=threshold, counter=online, triggered_at=now),
    }  # fmt: skip
    superuser = Client()
    superuser.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    for model, record in records.items():
        before = model_to_dict(type(record).objects.get(pk=record.pk))
        url = f"/admin/{model}/{record.pk}"
        assert superuser.get(f"/admin/{model}/").status_code == 200
        assert superuser.get(f"/admin/{model}/add/").status_code == 403
        page = superuser.get(f"{url}/change/")
        assert page.status_code == 200 and b'name="_save"' not in page.content, model  # view only
        edited = {field: "forged" if isinstance(value, str) else 99 for field, value in before.items() if field != "id"}
        assert superuser.post(f"{url}/change/", edited).status_code == 403, model
        assert superuser.post(f"{url}/delete/", {"post": "yes"}).status_code == 403, model
        bulk = {"action": "delete_selected", "_selected_action": [record.pk], "post": "yes"}
        superuser.post(f"/admin/{model}/", bulk)
        assert model_to_dict(type(record).objects.get(pk=record.pk)) == before, model


@pytest.mark.django_db
def test_api_key_is_shown_once_and_stored_hashed(client, builtins):
    superuser = Client()
    superuser.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    app = App.objects.get(slug="default")
    form = {"app": app.pk, "name": "game server", "roles": ["write", "data_view"], "active": "on"}
    created = superuser.post("/admin/counters/apikey/add/", form, follow=True)
    assert created.status_code == 200
    shown = [str(m) for m in created.context["messages"]]
    raw = next(m for m in shown if "New API key" in m).split("<code class='new-api-key'>")[1].split("</code>")[0]
    assert raw.startswith("ck_")

    key = ApiKey.objects.get()
    assert key.key_hash == hash_api_key(raw) and raw not in (key.key_hash, key.prefix)
    assert key.roles == ["write", "data_view"] and key.name == "game server"
    assert raw.encode() not in superuser.get(f"/admin/counters/apikey/{key.pk}/change/").content
    assert raw.encode() not in superuser.get("/admin/counters/apikey/").content

    r = client.post(
        "/api/v1/counter/matches_running/increment", {}, content_type="application/json", HTTP_X_API_KEY=raw
    )
    assert r.json() == {"success": True, "current_value": 1}


@pytest.mark.django_db
def test_console_shows_a_dash_when_the_counter_store_is_down(builtins, private_redis, settings):
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": private_redis.url}}
    superuser = Client()
    superuser.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    games = counter_named("total_games_played")
    bump(games, 3)
    page = superuser.get(CHANGELIST)
    assert b'<td class="field-live_value">3</td>' in page.content

    private_redis.kill()
    page = superuser.get(CHANGELIST)
    assert page.status_code == 200
    assert b'<td class="field-live_value">\xe2\x80\x94</td>' in page.content
    assert b'<td class="field-live_value">3</td>' not in page.content
    change = superuser.get(f"{CHANGELIST}{games.pk}/change/")
    assert change.status_code == 200 and b'class="live-value">\xe2\x80\x94<' in change.content
    confirm = superuser.get(RESET, {"ids": games.pk})
    assert b"The counter store is unavailable" in confirm.content
    refused = superuser.post(RESET, {"ids": str(games.pk), "reason": "x", "value": "0"}, follow=True)
    assert b"the counter store is unavailable (read-only); not reset." in refused.content
    assert not ResetLog.objects.exists()
