"""Bench-only settings: production settings plus the baseline view's URL (never deployed)."""

from counterproject.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
