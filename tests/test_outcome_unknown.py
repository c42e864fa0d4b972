"""A Redis that stalls after receiving an update: the reply must not invite a blind retry."""

import pytest
import redis
import requests

from counters import keyspace
from counters.models import Counter

from .processes import Gunicorn, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_timed_out_update_says_its_outcome_is_unknown_not_read_only(builtins, make_key, private_redis):
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    # Config is checked against Redis once a minute here, so only the update itself meets the stall.
    env = {"TEST_REDIS_URL": private_redis.url, "REDIS_SOCKET_TIMEOUT": "0.3", "COUNTER_CONFIG_CHECK_SECONDS": "60"}
    web = Gunicorn(workers=1, env=env)
    try:
        url = f"{web.url}/api/v1/counter/matches_running/increment"
        assert requests.post(url, json={}, headers=headers, timeout=10).json()["current_value"] == 1

        # A stopped redis-server (SIGSTOP, confirmed stopped before the request) leaves the update in
        # its socket: the web process times out, and Redis applies the update once it runs again.
        private_redis.freeze()
        try:
            reply = requests.post(url, json={}, headers=headers, timeout=10)
        finally:
            private_redis.thaw()
    finally:
        web.stop()

    assert reply.status_code == 504, reply.content
    assert reply.json()["error"]["code"] == 5004
    assert "may have been applied" in reply.json()["error"]["message"]
    assert "Retry-After" not in reply.headers
    # It was applied: a client that retried on a "try again later" would have counted it twice.
    counter = Counter.objects.get(name="matches_running")
    store = redis.Redis(port=private_redis.port)
    wait_until(lambda: store.hget(keyspace.value_key(counter.id, "", ""), "v") == b"2", what="the update applied")
