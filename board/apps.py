from django.apps import AppConfig


class BoardConfig(AppConfig):
    name = "board"
    verbose_name = "Live board"

    def ready(self) -> None:
        from . import schema  # noqa: F401  (the OpenAPI description of the board's endpoint registers here)
