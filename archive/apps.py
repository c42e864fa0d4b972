from django.apps import AppConfig


class ArchiveConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "archive"

    def ready(self) -> None:
        from . import schema  # noqa: F401  (the OpenAPI descriptions of the archive's endpoints register here)
