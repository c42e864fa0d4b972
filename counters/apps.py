from django.apps import AppConfig


class CountersConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "counters"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects config invalidation and key clean-up to model saves)
