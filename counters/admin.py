"""The operator console: counter config, live values, history charts, audited manual resets, API keys.

Viewing (``view_counter``), editing config (``change_counter``) and resetting values
(``reset_counter``) are separate permissions: an operator may hold any of them alone.
"""

from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from . import charts, clock, selectors, services
from .errors import CounterError
from .models import ApiKey, App, Counter, OperationLog, Threshold, ThresholdEvent
from .redis_store import StoreUnavailable
from .serializers import SUBJECT_HELP, SUBJECT_PATTERN

UNAVAILABLE = "—"
HISTORY_CHOICES = (7, 30, 90)
MAX_RESET_BATCH = 100
CHANGELIST_FILTERS = "_changelist_filters"


class ReadOnlyAdminMixin:
    """Audit records: listed and inspected, never added, edited or deleted by hand."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def live_values(counters: list[Counter]) -> dict[int, int] | None:
    """Current values of the counters that have one value (not per player), in one Redis round trip.

    None when the counter store is unavailable: the console still works, the values show as "—".
    """
    configs = [selectors.counter_config_get(counter_id=c.pk) for c in counters if c.scope != Counter.Scope.USER]
    items = [(config, "") for config in configs if config is not None]
    if not items:
        return {}
    views = selectors.counter_values_get(items=items)
    if any(view.degraded for view in views):
        return None
    return {view.counter.id: view.value for view in views}


def format_live(counter: Counter, values: dict[int, int] | None) -> str:
    if counter.scope == Counter.Scope.USER:
        return "per player"
    if values is None or counter.pk not in values:
        return UNAVAILABLE
    return f"{values[counter.pk]:,}"


class ThresholdInline(admin.TabularInline):
    model = Threshold
    extra = 0


class ExpiryFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expiry"

    def lookups(self, request, model_admin):
        return [("permanent", "Permanent"), ("temporary", "Temporary (live)"), ("expired", "Expired")]

    def queryset(self, request, queryset):
        now = clock.now()
        if self.value() == "permanent":
            return queryset.filter(expires_at__isnull=True)
        if self.value() == "temporary":
            return queryset.filter(expires_at__gt=now)
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now)
        return queryset


@admin.register(App)
class AppAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "time_zone", "created_at"]
    search_fields = ["slug", "name"]


class CounterResetForm(forms.Form):
    reason = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Required; kept in the reset log.",
        error_messages={"required": "Say why the counter is reset."},
    )
    value = forms.IntegerField(
        required=False,
        initial=0,
        help_text="The value after the reset; leave empty for each counter's configured reset value.",
    )
    player_id = forms.CharField(
        required=False, max_length=64, help_text="Per-player counters: the player whose value is reset."
    )

    def __init__(self, *args, needs_player: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.needs_player = needs_player
        if not needs_player:
            del self.fields["player_id"]

    def clean_player_id(self) -> str:
        player_id = self.cleaned_data.get("player_id", "").strip()
        if self.needs_player and not SUBJECT_PATTERN.match(player_id):
            raise forms.ValidationError(f"A per-player counter is reset for one player: {SUBJECT_HELP}.")
        return player_id


@admin.register(Counter)
class CounterAdmin(admin.ModelAdmin):
    list_display = ["name", "app", "live_value", "scope", "period", "bounds", "public", "unique_members", "expires_at"]
    list_filter = ["app", "kind", "scope", "period", "public", "unique_members", ExpiryFilter]
    list_select_related = ["app"]
    search_fields = ["name", "display_name", "description", "app__slug"]
    readonly_fields = ["created_at", "updated_at"]
    inlines = [ThresholdInline]
    actions = ["reset_counters"]
    fieldsets = [
        (None, {"fields": ["app", "name", "display_name", "description", "unit", "scope", "public"]}),
        (
            "Period and reset",
            {"fields": ["period", "time_zone", "reset_strategy", "reset_value", "reset_ratio", "reset_difference"]},
        ),
        ("Bounds", {"fields": ["min_value", "max_value", "allow_negative", "saturate"]}),
        ("Counting", {"fields": ["unique_members", "log_operations", "expires_at", "created_at", "updated_at"]}),
        ("Presence (docs/presence.md)", {"fields": ["kind", "lease_seconds", "presence_counts"]}),
        ("Hot-counter splitting (docs/splitting.md)", {"fields": ["shards"]}),
    ]

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        page = list(changelist.result_list)  # evaluates the page once; the template reuses these objects
        values = live_values(page)
        for counter in page:
            counter.live_display = format_live(counter, values)
        return changelist

    @admin.display(description="live value")
    def live_value(self, counter: Counter) -> str:
        return getattr(counter, "live_display", UNAVAILABLE)

    @admin.display(description="bounds")
    def bounds(self, counter: Counter) -> str:
        low = "-∞" if counter.allow_negative else f"{counter.min_value:,}"
        high = "∞" if counter.max_value is None else f"{counter.max_value:,}"
        return f"{low} … {high}"

    # --- change page: live value and history charts ------------------------------------------

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        counter = self.get_object(request, object_id)
        if counter is not None:
            extra_context.update(self._history_context(request, counter))
        extra_context["can_reset"] = self.has_reset_permission(request)
        return super().change_view(request, object_id, form_url, extra_context)

    def _history_context(self, request, counter: Counter) -> dict:
        try:
            limit = int(request.GET.get("history", HISTORY_CHOICES[0]))
        except ValueError:
            limit = HISTORY_CHOICES[0]
        limit = limit if limit in HISTORY_CHOICES else HISTORY_CHOICES[0]
        context = {
            "live_value": format_live(counter, live_values([counter])),
            "history_limit": limit,
            "history_choices": HISTORY_CHOICES,
            "history_chart": None,
            "hourly_chart": None,
        }
        config = selectors.counter_config_get(counter_id=counter.pk)
        if config is None or config.is_user_scoped:
            return context
        history = selectors.counter_history_get(counter_id=counter.pk, limit=limit)
        if counter.period != Counter.Period.NONE:
            context["history_chart"] = charts.bar_chart_svg(
                history, title=f"Last {limit} closed periods: final value (red tick: peak)"
            )
        hourly = selectors.counter_hourly_series_get(counter=config)
        span = "current period" if counter.period != Counter.Period.NONE else "last 24 hours"
        context["hourly_chart"] = charts.bar_chart_svg(
            hourly,
            title=f"Per hour, {span} ({config.time_zone}): value at the end of the hour (red tick: peak)",
            current_label=hourly[-1].label if hourly else "",
        )
        return context

    # --- manual reset ----------------------------------------------------------------------------

    def has_reset_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.reset_counter")

    @admin.action(permissions=["reset"], description="Reset selected counters (asks for a reason)…")
    def reset_counters(self, request, queryset) -> HttpResponse:
        ids = ",".join(str(pk) for pk in queryset.values_list("pk", flat=True)[:MAX_RESET_BATCH])
        query = urlencode({"ids": ids, CHANGELIST_FILTERS: request.GET.urlencode()})
        return HttpResponseRedirect(f"{reverse('admin:counters_counter_reset')}?{query}")

    def get_urls(self):
        reset = path("reset/", self.admin_site.admin_view(self.reset_view), name="counters_counter_reset")
        return [reset, *super().get_urls()]

    def reset_view(self, request: HttpRequest) -> HttpResponse:
        """Ask for the reason and the value, show the current values, then reset through the service."""
        if not self.has_reset_permission(request):
            raise PermissionDenied
        params = request.POST if request.method == "POST" else request.GET
        ids = [int(part) for part in params.get("ids", "").split(",") if part.strip().isdigit()][:MAX_RESET_BATCH]
        counters = list(Counter.objects.filter(pk__in=ids).select_related("app"))
        filters = params.get(CHANGELIST_FILTERS, "")
        # Back to the list the operator came from (only its query string is carried over).
        changelist_url = reverse("admin:counters_counter_changelist") + (f"?{filters}" if filters else "")
        if not counters:
            self.message_user(request, "Select at least one counter to reset.", messages.WARNING)
            return HttpResponseRedirect(changelist_url)
        needs_player = any(c.scope == Counter.Scope.USER for c in counters)
        form = CounterResetForm(request.POST or None, needs_player=needs_player)
        if request.method == "POST" and form.is_valid():
            self._reset(request, counters, form.cleaned_data)
            return HttpResponseRedirect(changelist_url)
        values = live_values(counters)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Reset counters",
            "form": form,
            "ids": ",".join(str(c.pk) for c in counters),
            "changelist_filters": filters,
            "changelist_url": changelist_url,
            "rows": [(c, format_live(c, values)) for c in counters],
            "store_unavailable": values is None,
        }
        return TemplateResponse(request, "admin/counters/counter/reset.html", context)

    def _reset(self, request: HttpRequest, counters: list[Counter], data: dict) -> None:
        operator = request.user.get_username()
        for counter in counters:
            config = selectors.counter_config_get(counter_id=counter.pk)
            subject = data.get("player_id", "") if counter.scope == Counter.Scope.USER else ""
            who = f" for player {subject}" if subject else ""
            try:
                if config is None:
                    raise CounterError(f"Counter {counter} no longer exists.")
                result = services.counter_reset(
                    counter=config, subject=subject, value=data["value"], reason=data["reason"], operator=operator
                )
            except StoreUnavailable:
                self.message_user(
                    request, f"{counter}: the counter store is unavailable (read-only); not reset.", messages.ERROR
                )
            except CounterError as error:
                self.message_user(request, f"{counter}: not reset: {error.message}", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"{counter}{who}: reset from {result.old_value:,} to {result.new_value:,}.",
                    messages.SUCCESS,
                )


class ApiKeyForm(forms.ModelForm):
    roles = forms.MultipleChoiceField(choices=ApiKey.Role.choices, widget=forms.CheckboxSelectMultiple)

    class Meta:
        model = ApiKey
        fields = ["app", "name", "roles", "active"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ["prefix", "app", "name", "roles", "active", "created_at"]
    list_filter = ["app", "active"]
    search_fields = ["prefix", "name"]

    def get_readonly_fields(self, request, obj=None):
        return ["prefix", "created_at"] if obj is not None else []

    def save_model(self, request, obj: ApiKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, raw = ApiKey.generate(app=obj.app, roles=obj.roles, name=obj.name)
        if not obj.active:
            key.active = False
            key.save(update_fields=["active"])
        # The admin goes on with ``obj`` (log entry, redirect): make it the saved key.
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = key.pk, key.prefix, key.key_hash, key.created_at
        obj._state.adding = False
        obj._state.db = key._state.db
        self.message_user(
            request,
            format_html(
                "New API key: <code class='new-api-key'>{}</code> — copy it now. Only its hash is stored: "
                "it cannot be shown again.",
                raw,
            ),
            messages.WARNING,
        )


@admin.register(ThresholdEvent)
class ThresholdEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["triggered_at", "counter", "threshold", "level", "subject", "period"]
    list_filter = ["counter__app", "threshold__level", "counter"]
    list_select_related = ["counter__app", "threshold__counter__app"]
    search_fields = ["counter__name", "subject"]
    date_hierarchy = "triggered_at"

    @admin.display(description="level")
    def level(self, event: ThresholdEvent) -> str:
        return event.threshold.get_level_display()


@admin.register(OperationLog)
class OperationLogAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "counter", "actor", "user_id", "subject", "old_value", "new_value", "period"]
    list_filter = ["counter__app", "counter", "actor", "created_at"]
    list_select_related = ["counter__app"]
    search_fields = ["actor", "user_id", "subject", "counter__name"]
    date_hierarchy = "created_at"
