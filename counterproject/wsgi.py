"""
WSGI config for counterproject project.

It exposes the WSGI callable as a module-level variable named ``application``.

For more information on this file, see
https://docs.djangoproject.com/en/5.2/howto/deployment/wsgi/
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "counterproject.settings")

application = get_wsgi_application()

from counters.redis_store import store_check  # noqa: E402 (after Django is set up)

# A Redis Cluster that is misconfigured (no seed answers, slots not served) stops the start here.
store_check()
