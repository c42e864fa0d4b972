"""The fast lane: lean async handlers for the hot endpoints, in front of Django (counterproject.asgi).

Same validation, config snapshot, key lookup, Lua scripts and error path as the DRF views, which
stay the one description of the shapes and the schema; the contract tests run the REST v1 and
cloud-function suites through the real server so the two cannot drift.
"""
