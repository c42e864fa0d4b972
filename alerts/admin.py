from django.contrib import admin, messages
from django.db import models

from .models import Channel, Delivery, DeliveryAttempt, Message
from .services import deliveries_retry


@admin.register(Channel)
class ChannelAdmin(admin.ModelAdmin):
    list_display = ["__str__", "kind", "threshold", "enabled", "created_at"]
    list_filter = ["kind", "enabled", "threshold__counter__app"]
    search_fields = ["name", "threshold__counter__name", "recipients", "url"]
    list_select_related = ["threshold__counter__app"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}


class DeliveryAttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    readonly_fields = ["number", "started_at", "duration_ms", "ok", "status_code", "error"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["id", "channel", "event", "status", "attempts", "created_at", "finished_at"]
    list_filter = ["status", "channel__kind"]
    list_select_related = ["channel__threshold__counter__app", "event"]
    readonly_fields = [f.name for f in Delivery._meta.fields]
    inlines = [DeliveryAttemptInline]
    actions = ["retry"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Retry failed deliveries (a new round of attempts)")
    def retry(self, request, queryset) -> None:
        count = deliveries_retry(delivery_ids=list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"{count} failed deliveries queued again.", messages.SUCCESS)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["title", "level", "app", "counter", "created_at"]
    list_filter = ["level", "app"]
    search_fields = ["title", "body"]
    readonly_fields = ["app", "counter", "event", "delivery", "level", "title", "body", "created_at"]

    def has_add_permission(self, request) -> bool:
        return False
