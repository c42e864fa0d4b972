from django.core.management.base import BaseCommand, CommandError

from counters.models import ApiKey, App


class Command(BaseCommand):
    help = "Create an API key for an app and print it (shown once; only its hash is stored) as the last line."

    def add_arguments(self, parser):
        parser.add_argument("--app", default="default", help="App slug (default: default).")
        parser.add_argument(
            "--roles",
            default="write",
            help="Comma-separated roles: write, counter_manage (alias manage), data_view (alias view), "
            "global_admin (alias global).",
        )
        parser.add_argument("--name", default="", help="A label for the key.")
        parser.add_argument("--create-app", action="store_true", help="Create the app if it does not exist.")

    def handle(self, *args, app: str, roles: str, name: str, create_app: bool, **options):
        valid = set(ApiKey.Role.values)
        wanted = []
        for role in filter(None, (r.strip() for r in roles.split(","))):
            role = ApiKey.ROLE_ALIASES.get(role, role)
            if role not in valid:
                raise CommandError(f"Unknown role {role!r}; choose from {', '.join(sorted(valid))}.")
            wanted.append(str(role))
        if not wanted:
            raise CommandError("Give at least one role.")
        app_obj = App.objects.filter(slug=app).first()
        if app_obj is None:
            if not create_app:
                known = ", ".join(App.objects.values_list("slug", flat=True))
                raise CommandError(f"No app {app!r} (known: {known}). Add --create-app to create it.")
            app_obj = App.objects.create(slug=app, name=app)
        key, raw = ApiKey.generate(app=app_obj, roles=sorted(set(wanted)), name=name)
        self.stdout.write(f"Created key {key.prefix}… for app {app_obj.slug} with roles {', '.join(key.roles)}.")
        self.stdout.write(raw)
