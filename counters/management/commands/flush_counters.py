import time

from django.conf import settings
from django.core.management.base import BaseCommand

from counters.flush import counters_flush
from counters.write_through import store_reconcile


class Command(BaseCommand):
    help = "Write pending counter deltas from Redis to PostgreSQL (once, or in a loop)."

    def add_arguments(self, parser):
        parser.add_argument("--loop", action="store_true", help="Keep flushing every COUNTER_FLUSH_INTERVAL_SECONDS.")

    def handle(self, *args, loop: bool, **options):
        while True:
            stats = counters_flush()
            reconciled = store_reconcile()
            if not loop:
                if stats.locked_out:
                    self.stdout.write("another flusher holds the lock; nothing done")
                    return
                self.stdout.write(
                    f"flushed {stats.batches} batches ({stats.values} values, {stats.operations} operations, "
                    f"{stats.members} members); skipped {stats.skipped} already applied; "
                    f"refused {stats.refused} values behind PostgreSQL ({stats.rebased} rebased); "
                    f"reconciled {reconciled.corrected} written-through values"
                )
                return
            time.sleep(settings.COUNTER_FLUSH_INTERVAL_SECONDS)
