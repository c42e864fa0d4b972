"""Settings read from the environment, with defaults that work on a developer machine.

Production differs from development by environment variables only (see README).
"""

from pathlib import Path

import environ

from archive.retention import MIN_RETENTION_DAYS, retention_days_checked
from metrics.access import allowed_networks_parsed, exported_counters_parsed

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

SECRET_KEY = env("DJANGO_SECRET_KEY", default="dev-only-insecure-secret-key-change-me")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_celery_beat",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "counters",
    "archive",
    "alerts",
    "board",
]

MIDDLEWARE = [
    # Outermost, so that it times the whole stack and sees the final status of every response.
    "metrics.middleware.RequestMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "counterproject.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "counterproject.wsgi.application"

DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://root@127.0.0.1:5432/counters"),
}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env.int("DATABASE_CONNECT_TIMEOUT", default=3)
# pytest-django creates this database; parallel runs on one machine pick different names.
DATABASES["default"]["TEST"] = {"NAME": env("DJANGO_TEST_DATABASE_NAME", default="test_counters")}

REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")
# The hot store is one Redis (REDIS_URL) or, with REDIS_CLUSTER=true, a Redis Cluster whose seed
# nodes REDIS_URL lists, comma-separated: redis://10.0.0.1:7000,10.0.0.2:7000 (docs/cluster.md).
# Only the hot store is clustered: CELERY_BROKER_URL stays a plain Redis.
REDIS_CLUSTER = env.bool("REDIS_CLUSTER", default=False)
# Short timeouts: a Redis that does not answer must not hold a request for long.
REDIS_SOCKET_TIMEOUT = env.float("REDIS_SOCKET_TIMEOUT", default=0.5)
REDIS_CONNECT_TIMEOUT = env.float("REDIS_CONNECT_TIMEOUT", default=0.5)

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cache",
        "OPTIONS": {
            "SOCKET_TIMEOUT": REDIS_SOCKET_TIMEOUT,
            "SOCKET_CONNECT_TIMEOUT": REDIS_CONNECT_TIMEOUT,
            "CONNECTION_POOL_KWARGS": {"max_connections": env.int("REDIS_MAX_CONNECTIONS", default=64)},
        },
    }
}
# The Django cache holds nothing of the service; in cluster mode its connection to the hot store
# (django-redis speaks to one node) is not used, so it stays in the process.
if REDIS_CLUSTER:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# The admin's static files are served by the web process itself (no CDN, no separate server).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["counters.rendering.OrjsonRenderer"],
    "DEFAULT_PARSER_CLASSES": ["counters.rendering.OrjsonParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "counters.api_errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# OpenAPI 3 of both surfaces at /api/schema/, docs at /api/docs/ (Swagger UI served locally: works offline).
SPECTACULAR_SETTINGS = {
    "TITLE": "Counter service",
    "DESCRIPTION": "REST v1 and the cloud functions of the counter service. See docs/cloud-functions.md.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "APPEND_COMPONENTS": {
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
            "playerToken": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "Player <token> (getCounter only: a player's own values)",
            },
        }
    },
    "SECURITY": [{"apiKey": []}, {}],
}

# Celery: the broker lives in its own Redis database, apart from the counter store.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/1")
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A safety net like gunicorn's max_requests (bench/README-soak.md shows memory is flat without it):
# a pool process is replaced after this many tasks (the flush runs once a second). 0 switches it off.
# Not named CELERY_WORKER_...: Celery's command line reads every CELERY_<COMMAND>_<OPTION> variable as
# that option, and `celery worker --max-tasks-per-child 0` refuses to start.
CELERY_WORKER_MAX_TASKS_PER_CHILD = env.int("WORKER_MAX_TASKS_PER_CHILD", default=50000) or None

# Counter service knobs.
COUNTER_DEFAULT_TIME_ZONE = env("COUNTER_DEFAULT_TIME_ZONE", default="UTC")
COUNTER_FLUSH_INTERVAL_SECONDS = env.float("COUNTER_FLUSH_INTERVAL_SECONDS", default=1.0)
COUNTER_FLUSH_LOCK_SECONDS = env.float("COUNTER_FLUSH_LOCK_SECONDS", default=10.0)
COUNTER_CONFIG_CACHE_SECONDS = env.float("COUNTER_CONFIG_CACHE_SECONDS", default=30.0)
COUNTER_CONFIG_CHECK_SECONDS = env.float("COUNTER_CONFIG_CHECK_SECONDS", default=1.0)
# A deleted counter's Redis keys are dropped this long after the delete: by then no process's
# config snapshot (at most COUNTER_CONFIG_CACHE_SECONDS old) nor request in flight can write them.
COUNTER_DELETED_KEYS_GRACE_SECONDS = env.float("COUNTER_DELETED_KEYS_GRACE_SECONDS", default=120.0)
COUNTER_PRESENCE_SWEEP_SECONDS = env.float("COUNTER_PRESENCE_SWEEP_SECONDS", default=15.0)
COUNTER_METADATA_MAX_BYTES = env.int("COUNTER_METADATA_MAX_BYTES", default=4096)
# An Idempotency-Key is remembered this long after the write that first used it (docs/idempotency.md).
COUNTER_IDEMPOTENCY_KEY_SECONDS = env.int("COUNTER_IDEMPOTENCY_KEY_SECONDS", default=24 * 3600)
# The largest request body the web process reads (413 above it): a batch of 1,000 updates with
# the largest metadata each is about 4.2 MB.
COUNTER_MAX_BODY_BYTES = env.int("COUNTER_MAX_BODY_BYTES", default=8 * 1024 * 1024)
# How often the live board (/board/) asks for new values.
BOARD_POLL_MILLISECONDS = env.int("BOARD_POLL_MILLISECONDS", default=1000)
# Server-sent events (GET /api/v1/stream): at most one event per counter per this many ms on a
# stream (the last value always follows), a comment line every this many seconds on an idle stream
# (so that proxies keep it open), and whether the board streams (else it only polls).
COUNTER_STREAM_MIN_INTERVAL_MS = env.int("COUNTER_STREAM_MIN_INTERVAL_MS", default=250)
COUNTER_STREAM_HEARTBEAT_SECONDS = env.float("COUNTER_STREAM_HEARTBEAT_SECONDS", default=15.0)
BOARD_STREAM = env.bool("BOARD_STREAM", default=True)
# Player tokens (Authorization: Player <token>) expire after this many seconds.
COUNTER_PLAYER_TOKEN_SECONDS = env.int("COUNTER_PLAYER_TOKEN_SECONDS", default=24 * 3600)
# Operation-log entries older than this are deleted by the hourly trim task.
COUNTER_OPERATION_LOG_RETENTION_DAYS = env.int("COUNTER_OPERATION_LOG_RETENTION_DAYS", default=30)

# Threshold alerts (see docs/thresholds.md).
ALERTS_HTTP_TIMEOUT_SECONDS = env.float("ALERTS_HTTP_TIMEOUT_SECONDS", default=5.0)
ALERTS_MAX_ATTEMPTS = env.int("ALERTS_MAX_ATTEMPTS", default=6)
ALERTS_RETRY_BASE_SECONDS = env.float("ALERTS_RETRY_BASE_SECONDS", default=10.0)
ALERTS_RETRY_MAX_SECONDS = env.float("ALERTS_RETRY_MAX_SECONDS", default=600.0)
ALERTS_SWEEP_INTERVAL_SECONDS = env.int("ALERTS_SWEEP_INTERVAL_SECONDS", default=60)
ALERTS_SWEEP_GRACE_SECONDS = env.int("ALERTS_SWEEP_GRACE_SECONDS", default=300)
ALERTS_SWEEP_LOOKBACK_SECONDS = env.int("ALERTS_SWEEP_LOOKBACK_SECONDS", default=86400)
ALERTS_MAX_THRESHOLDS_PER_COUNTER = env.int("ALERTS_MAX_THRESHOLDS_PER_COUNTER", default=20)
ALERTS_SMS_BACKEND = env("ALERTS_SMS_BACKEND", default="alerts.sms.LoggingBackend")
ALERTS_SMS_GATEWAY_URL = env("ALERTS_SMS_GATEWAY_URL", default="")
ALERTS_SMS_GATEWAY_TOKEN = env("ALERTS_SMS_GATEWAY_TOKEN", default="")
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_TIMEOUT = env.float("EMAIL_TIMEOUT", default=10.0)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="counters@localhost")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
}

# Circuit breaker around Redis: open after this many consecutive failures, probe again after.
REDIS_BREAKER_THRESHOLD = env.int("REDIS_BREAKER_THRESHOLD", default=3)
REDIS_BREAKER_RESET_SECONDS = env.float("REDIS_BREAKER_RESET_SECONDS", default=2.0)
# Updates while Redis is down: "reject" (503, read-only, as docs/requirements.md asks) or "write_through"
# (straight to PostgreSQL; see docs/operations.md for the trade-off).
COUNTER_REDIS_DOWN_WRITES = env("COUNTER_REDIS_DOWN_WRITES", default="reject")

# Archive of closed periods: kept this many days (never fewer than 7, so a week is always there).
COUNTER_ARCHIVE_MIN_RETENTION_DAYS = MIN_RETENTION_DAYS
COUNTER_ARCHIVE_RETENTION_DAYS = retention_days_checked(
    env.int("COUNTER_ARCHIVE_RETENTION_DAYS", default=90), COUNTER_ARCHIVE_MIN_RETENTION_DAYS
)
COUNTER_ARCHIVE_LOCK_SECONDS = env.float("COUNTER_ARCHIVE_LOCK_SECONDS", default=600.0)

# /metrics (docs/metrics.md): open to callers on these networks (the TCP peer's address) or with
# "Authorization: Bearer <METRICS_TOKEN>". Empty token: networks only.
METRICS_TOKEN = env("METRICS_TOKEN", default="")
METRICS_ALLOWED_NETWORKS = allowed_networks_parsed(
    env.list("METRICS_ALLOWED_NETWORKS", default=["127.0.0.1/32", "::1/128"])
)
# Public counters whose values /metrics exports, as "app/name" ("app/*": every public counter of
# the app). Per-player counters are never exported; at most METRICS_COUNTERS_MAX series.
METRICS_COUNTERS = exported_counters_parsed(env.list("METRICS_COUNTERS", default=[]))
METRICS_COUNTERS_MAX = env.int("METRICS_COUNTERS_MAX", default=100)
