"""The operator console in a real browser: live value, history chart, a reset with a reason, the reset log."""

from datetime import timedelta

import pytest
import requests
from django.contrib.auth.models import User
from playwright.sync_api import expect

from archive.models import PeriodArchive, ResetLog
from counters import clock, periods
from counters.flush import counters_flush
from counters.models import Counter

from .browser import admin_login, chromium_page, screenshot

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def archive_past_days(counter: Counter, days: int) -> list[int]:
    """Closed periods as the archive task leaves them (values 10, 20, ...), oldest first."""
    today = periods.window_at(counter.period, counter.effective_time_zone, clock.now())
    values = []
    for back in range(days, 0, -1):
        start = today.start - timedelta(days=back)
        value = 10 * (days - back + 1)
        PeriodArchive.objects.create(
            counter=counter,
            period=start.date().isoformat(),
            period_start=start,
            period_end=start + timedelta(days=1),
            time_zone=counter.effective_time_zone,
            final_value=value,
            peak=value + 3,
            operations=value,
        )
        values.append(value)
    return values


def test_operator_sees_live_value_and_chart_then_resets_with_a_reason(live_server, builtins, make_key):
    User.objects.create_superuser("alice", "alice@example.com", "s3cret-pass")
    counter = Counter.objects.get(app__slug="default", name="total_games_played")
    archived = archive_past_days(counter, 10)
    key = make_key(("write",))
    for _ in range(5):
        r = requests.post(
            f"{live_server.url}/api/v1/counter/total_games_played/increment",
            json={"value": 1},
            headers={"Authorization": f"Bearer {key}"},
            timeout=5,
        )
        assert r.status_code == 200
    counters_flush()  # the per-hour chart reads the stats the flusher writes

    with chromium_page() as page:
        admin_login(page, live_server.url, "alice", "s3cret-pass")
        page.goto(f"{live_server.url}/admin/counters/counter/?q=total_games_played")
        row = page.locator("#result_list tbody tr", has_text="total_games_played")
        expect(row.locator("td.field-live_value")).to_have_text("5")
        screenshot(page, "admin-counter-list")

        row.locator("th a").click()
        expect(page.locator(".live-value")).to_have_text("5")
        history = page.locator(".chart-history svg rect.bar")
        expect(history).to_have_count(7)
        assert [int(v) for v in history.evaluate_all("bars => bars.map(b => b.dataset.value)")] == archived[-7:]
        hourly = page.locator(".chart-hourly svg rect.bar")
        expect(hourly.last).to_have_attribute("data-value", "5")
        screenshot(page, "admin-counter-change")
        page.click("#counter-history a:text-is('30')")
        expect(page.locator(".chart-history svg rect.bar")).to_have_count(10)

        page.goto(f"{live_server.url}/admin/counters/counter/?q=total_games_played")
        page.locator("#result_list tbody tr", has_text="total_games_played").locator("input.action-select").check()
        page.select_option("select[name=action]", "reset_counters")
        page.click("button[name=index]")
        expect(page.locator("#reset-targets .current-value")).to_have_text("5")
        page.click("input[name=confirm]")  # no reason: the browser refuses to send the form
        expect(page.locator("#id_reason")).to_have_js_property("validity.valueMissing", True)
        expect(page.locator("#reset-targets")).to_be_visible()
        page.fill("#id_reason", "tournament replay: games counted twice")
        page.fill("#id_value", "0")
        screenshot(page, "admin-reset-confirm")
        page.click("input[name=confirm]")
        expect(page.locator(".messagelist")).to_contain_text("reset from 5 to 0")
        expect(page.locator("#result_list tbody tr td.field-live_value")).to_have_text("0")
        screenshot(page, "admin-after-reset")

        page.goto(f"{live_server.url}/admin/archive/resetlog/")
        entry = page.locator("#result_list tbody tr")
        expect(entry).to_have_count(1)
        expect(entry).to_contain_text("alice")
        expect(entry).to_contain_text("tournament replay: games counted twice")
        expect(entry.locator("td.field-value_before")).to_have_text("5")
        expect(entry.locator("td.field-value_after")).to_have_text("0")
        screenshot(page, "admin-reset-log")

    assert requests.get(f"{live_server.url}/api/v1/counter/total_games_played", timeout=5).json()["value"] == 0
    log = ResetLog.objects.get()  # one reset: the form without a reason was never sent
    assert (log.operator, log.kind, log.value_before, log.value_after) == ("alice", "manual", 5, 0)
