"""History and audit records: read-only in the console."""

from django.contrib import admin

from counters.admin import ReadOnlyAdminMixin

from .models import PeriodArchive, ResetLog


@admin.register(PeriodArchive)
class PeriodArchiveAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["counter", "subject", "period", "final_value", "peak", "operations", "time_zone", "archived_at"]
    list_filter = ["counter__app", "counter__period", "counter"]
    list_select_related = ["counter__app"]
    search_fields = ["counter__name", "subject", "period"]
    date_hierarchy = "period_start"


@admin.register(ResetLog)
class ResetLogAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "counter", "kind", "operator", "reason", "subject", "value_before", "value_after"]
    list_filter = ["kind", "counter__app", "counter"]
    list_select_related = ["counter__app"]
    search_fields = ["counter__name", "operator", "reason", "subject"]
    date_hierarchy = "created_at"
