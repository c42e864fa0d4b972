from django.apps import AppConfig


class CountersConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "counters"

    def ready(self) -> None:
        # receivers: config invalidation and key clean-up on model saves. function_schema and schema:
        # the OpenAPI descriptions of the cloud functions and of REST v1 (applied to the views).
        from . import function_schema, receivers, schema  # noqa: F401
