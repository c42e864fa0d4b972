from django.contrib import admin

from .models import PeriodArchive, ResetLog


@admin.register(PeriodArchive)
class PeriodArchiveAdmin(admin.ModelAdmin):
    list_display = ["counter", "subject", "period", "final_value", "peak", "operations", "archived_at"]
    list_filter = ["counter"]


@admin.register(ResetLog)
class ResetLogAdmin(admin.ModelAdmin):
    list_display = ["counter", "kind", "operator", "reason", "value_before", "value_after", "created_at"]
    list_filter = ["kind", "counter"]
