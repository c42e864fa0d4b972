"""A Redis that stalls after receiving an update: the reply must not invite a blind retry."""

import threading
import time

import pytest
import redis
import requests

from counters import keyspace
from counters.models import Counter

from .processes import Gunicorn

pytestmark = pytest.mark.django_db(transaction=True)

SPIN_TWO_SECONDS = """
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= 2000000
return 1
"""


def test_a_timed_out_update_says_its_outcome_is_unknown_not_read_only(builtins, make_key, private_redis):
    key = make_key(("write",))
    headers = {"Authorization": f"Bearer {key}"}
    # Config is checked against Redis once a minute here, so only the update itself meets the stall.
    env = {"TEST_REDIS_URL": private_redis.url, "REDIS_SOCKET_TIMEOUT": "0.3", "COUNTER_CONFIG_CHECK_SECONDS": "60"}
    web = Gunicorn(workers=1, env=env)
    try:
        url = f"{web.url}/api/v1/counter/online_players/increment"
        assert requests.post(url, json={}, headers=headers, timeout=10).json()["current_value"] == 1

        # Redis runs one command at a time: while a script spins, the increment waits in its queue,
        # the web process times out, and then Redis applies the increment anyway.
        stall = threading.Thread(target=lambda: redis.Redis(port=private_redis.port).eval(SPIN_TWO_SECONDS, 0))
        stall.start()
        time.sleep(0.5)
        reply = requests.post(url, json={}, headers=headers, timeout=10)
        stall.join()
    finally:
        web.stop()

    assert reply.status_code == 504, reply.content
    assert reply.json()["error"]["code"] == 5004
    assert "may have been applied" in reply.json()["error"]["message"]
    assert "Retry-After" not in reply.headers
    # It was applied: a client that retried on a "try again later" would have counted it twice.
    counter = Counter.objects.get(name="online_players")
    assert redis.Redis(port=private_redis.port).hget(keyspace.value_key(counter.id, "", ""), "v") == b"2"
