from django.contrib import admin

from .models import ApiKey, App, Counter, Threshold


class ThresholdInline(admin.TabularInline):
    model = Threshold
    extra = 0


@admin.register(App)
class AppAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "time_zone", "created_at"]
    search_fields = ["slug", "name"]


@admin.register(Counter)
class CounterAdmin(admin.ModelAdmin):
    list_display = ["name", "app", "scope", "period", "public", "unique_members", "expires_at"]
    list_filter = ["app", "scope", "period", "public"]
    search_fields = ["name", "display_name"]
    inlines = [ThresholdInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "app", "name", "roles", "active", "created_at"]
    list_filter = ["app", "active"]
    readonly_fields = ["prefix", "key_hash"]
