"""Test settings: the same services as development, in databases of their own.

``TEST_REDIS_URL`` / ``TEST_BROKER_URL`` let two test runs on one machine stay apart
(with ``DJANGO_TEST_DATABASE_NAME``).
"""

from .settings import *  # noqa: F403
from .settings import CACHES, env

REDIS_URL = env("TEST_REDIS_URL", default="redis://127.0.0.1:6379/15")
REDIS_CLUSTER = env.bool("TEST_REDIS_CLUSTER", default=False)
if not REDIS_CLUSTER:
    CACHES["default"]["LOCATION"] = REDIS_URL
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
CELERY_BROKER_URL = env("TEST_BROKER_URL", default="redis://127.0.0.1:6379/14")
COUNTER_CONFIG_CACHE_SECONDS = 30.0
COUNTER_CONFIG_CHECK_SECONDS = env.float("COUNTER_CONFIG_CHECK_SECONDS", default=0.0)
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Static files come from the app directories (WHITENOISE_USE_FINDERS); nothing is collected in tests.
STATIC_ROOT = None
