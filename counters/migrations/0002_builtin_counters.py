from django.db import migrations

from counters.builtins import ensure_builtins


def create_builtins(apps, schema_editor):
    ensure_builtins(apps.get_model("counters", "App"), apps.get_model("counters", "Counter"))


class Migration(migrations.Migration):
    dependencies = [("counters", "0001_initial")]

    operations = [migrations.RunPython(create_builtins, migrations.RunPython.noop)]
