from django.apps import AppConfig


class AlertsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "alerts"
    verbose_name = "Threshold alerts"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects to counters.signals.threshold_crossed)
