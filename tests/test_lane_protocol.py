"""The web worker's HTTP protocol (``counterproject.lane_protocol``) through the real server, on raw
sockets: what HTTP/1.1 lets a client do (pipeline, send a body in pieces, close, hang up early) gets
the answers it gets from uvicorn's own path, in order, and each request's change is applied once."""

import re
import signal
import socket
import time

import orjson
import pytest
import requests

from .processes import Gunicorn, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

COUNTER = "/api/v1/counter/matches_running"


@pytest.fixture
def web(builtins):
    server = Gunicorn(workers=1)
    yield server
    server.stop()


@pytest.fixture
def bearer(make_key) -> str:
    return make_key(("write",))


def _post(path: str, key: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (path.encode(), key.encode(), len(body), extra, body)
    )


def _get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path.encode(), extra)


def _connect(web) -> socket.socket:
    return socket.create_connection(("127.0.0.1", web.port), timeout=10)


def _replies(sock: socket.socket, count: int) -> list[tuple[int, dict, bytes]]:
    """``count`` replies read off the socket: (status, headers, body), framed by Content-Length."""
    data, replies = b"", []
    while len(replies) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = data[:head_end].decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            length = int(headers["content-length"])
            if len(data) >= head_end + 4 + length:
                body = data[head_end + 4 : head_end + 4 + length]
                replies.append((int(lines[0].split()[1]), headers, body))
                data = data[head_end + 4 + length :]
                continue
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no more after {replies} and {data!r}") from None
        assert chunk, f"the connection closed after {len(replies)} of {count} replies"
        data += chunk
    assert data == b""
    return replies


def _value(web) -> int:
    return requests.get(f"{web.url}{COUNTER}", timeout=10).json()["value"]


def test_the_worker_answers_the_lane_in_its_http_protocol(web):
    assert "answered in the HTTP protocol" in web.output()


def test_pipelined_requests_lane_and_django_alike_are_answered_in_order(web, bearer):
    requests_ = [
        _post(f"{COUNTER}/increment", bearer, b'{"value": 2}'),
        _get("/healthz"),  # Django's
        _post(f"{COUNTER}/increment", bearer, b'{"value": 3}'),
        _get(COUNTER),
        _post(f"{COUNTER}/increment", bearer, b'{"value": 1.5}'),  # refused
        _post(f"{COUNTER}/decrement", bearer, b'{"value": 1}'),
        _get(
            "/api/v1/counters?names=matches_running,daily_active_users",
            b"Authorization: Bearer %s\r\n" % bearer.encode(),
        ),
    ]
    with _connect(web) as sock:
        sock.sendall(b"".join(requests_))
        replies = _replies(sock, len(requests_))
    statuses = [status for status, _, _ in replies]
    assert statuses == [200, 200, 200, 200, 400, 200, 200]
    assert replies[0][2] == b'{"success":true,"current_value":2}'
    assert replies[1][1]["content-type"].startswith("application/json")
    assert replies[2][2] == b'{"success":true,"current_value":5}'
    assert b'"value":5' in replies[3][2]
    assert b'"code":4001' in replies[4][2]
    assert replies[5][2] == b'{"success":true,"current_value":4}'
    assert b'{"name":"matches_running","value":4}' in replies[6][2]
    assert _value(web) == 4


def test_a_body_sent_in_pieces_is_waited_for(web, bearer):
    request = _post(f"{COUNTER}/increment", bearer, b'{"value": 7}')
    head, body = request.split(b"\r\n\r\n")
    with _connect(web) as sock:
        sock.sendall(head + b"\r\n\r\n")
        time.sleep(0.3)
        sock.sendall(body[:4])
        time.sleep(0.3)
        sock.sendall(body[4:])
        [(status, _, reply)] = _replies(sock, 1)
    assert (status, reply) == (200, b'{"success":true,"current_value":7}')


def test_connection_close_and_http_1_0_and_a_chunked_body_are_answered(web, bearer):
    with _connect(web) as sock:
        sock.sendall(_post(f"{COUNTER}/increment", bearer, b'{"value": 1}', b"Connection: close\r\n"))
        [(status, headers, reply)] = _replies(sock, 1)
        assert sock.recv(100) == b""  # then closed
    assert status == 200 and headers["connection"] == "close" and reply.endswith(b":1}")

    http_10 = _post(f"{COUNTER}/increment", bearer, b'{"value": 1}').replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    with _connect(web) as sock:
        sock.sendall(http_10)
        [(status, _, reply)] = _replies(sock, 1)
    assert (status, reply) == (200, b'{"success":true,"current_value":2}')

    chunked = (
        b"POST %s/increment HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"val\r\n7\r\nue": 3}\r\n0\r\n\r\n' % (COUNTER.encode(), bearer.encode())
    )
    with _connect(web) as sock:
        sock.sendall(chunked)
        [(status, _, reply)] = _replies(sock, 1)
    assert (status, reply) == (200, b'{"success":true,"current_value":5}')


def test_a_declared_body_over_the_limit_is_refused_without_changing_anything(builtins, bearer):
    web = Gunicorn(workers=1, env={"COUNTER_MAX_BODY_BYTES": "100"})
    try:
        with _connect(web) as sock:
            sock.sendall(
                _post(f"{COUNTER}/increment", bearer, b'{"value": 1, "metadata": {"x": "' + b"a" * 200 + b'"}}')
            )
            # uvicorn writes the head and the body of this reply apart: read it whole, by its length.
            [(status, _, reply)] = _replies(sock, 1)
        value = _value(web)
    finally:
        web.stop()
    assert status == 413 and b'"code":4001' in reply
    assert value == 0


def test_a_client_that_hangs_up_before_its_reply_leaves_the_worker_serving(web, bearer):
    for _ in range(50):
        sock = _connect(web)
        sock.sendall(_post(f"{COUNTER}/increment", bearer, b'{"value": 1}'))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()
    # Each increment was read whole before the hang-up: each is applied, once.
    wait_until(lambda: _value(web) == 50, timeout=10, what="the 50 increments")
    reply = requests.post(
        f"{web.url}{COUNTER}/increment", json={"value": 1}, headers={"Authorization": f"Bearer {bearer}"}, timeout=10
    )
    assert reply.json()["current_value"] == 51
    assert not re.search(r"Traceback|Exception in ASGI", web.output())


def test_keep_alive_serves_many_requests_on_one_connection(web, bearer):
    with _connect(web) as sock:
        for n in range(1, 201):
            sock.sendall(_post(f"{COUNTER}/increment", bearer, b'{"value": 1}'))
            [(status, headers, reply)] = _replies(sock, 1)
            assert status == 200 and reply == b'{"success":true,"current_value":%d}' % n
    assert "connection" not in headers and headers["server"] == "uvicorn" and "date" in headers


def test_each_request_on_one_connection_answers_in_its_own_language(web, bearer):
    """A cloud function answers in the language its request asks for; on the lane's protocol the
    language is switched for that request's task only (``handlers.answer(own_task=True)``), so the
    next request on the same connection, pipelined or not, starts from the default again."""
    function = "/api/v1/functions/increaseCounter"
    body = b'{"appId":"default","counterType":"app","counterId":"matches_running","increment":1}'
    chinese, traditional = b"Accept-Language: zh-CN\r\n", b"Accept-Language: zh-TW\r\n"
    missing = body.replace(b"matches_running", b"nope")
    with _connect(web) as sock:
        for _ in range(3):
            sock.sendall(
                _post(function, bearer, body, chinese)
                + _post(function, bearer, body)
                + _post(function, bearer, missing, traditional)
                + _post(function, bearer, missing)
            )
            replies = _replies(sock, 4)
            assert [status for status, _, _ in replies] == [200, 200, 404, 404]
            messages = [orjson.loads(reply)["msg"] for _, _, reply in replies]
            assert messages[:2] == ["增加成功", "Increased"]
            assert "不存在" in messages[2] and "not found" in messages[3], messages


# The config generation checked at most once a second, as in production (the tests' settings check
# it on every request, which sends every request through ``answer``'s task).
PRODUCTION_CHECKS = {"COUNTER_CONFIG_CHECK_SECONDS": "1"}


@pytest.fixture
def checked_each_second(builtins):
    server = Gunicorn(workers=1, env=PRODUCTION_CHECKS)
    yield server
    server.stop()


def _each_answered(sock: socket.socket, requests_: list[bytes]) -> list[tuple[int, dict, bytes]]:
    """Each request sent once the one before it was answered: their replies."""
    replies = []
    for request in requests_:
        sock.sendall(request)
        replies += _replies(sock, 1)
    return replies


def _same_but_date(first: dict, second: dict) -> bool:
    """The same headers but the Date and the Content-Length (``_replies`` framed each by it)."""
    other = ("date", "content-length")
    return {k: v for k, v in first.items() if k not in other} == {k: v for k, v in second.items() if k not in other}


def test_an_update_sent_again_is_answered_as_the_first_was(checked_each_second, bearer):
    """An increment sent again by the same key with the same body keeps its checks (a plan, from
    its second pass) and is answered from its script call's callback, without a task: the reply
    keeps every header of the first, each update is applied once, pipelined ones in order."""
    web = checked_each_second
    increment = _post(f"{COUNTER}/increment", bearer, b'{"value": 2}')
    with _connect(web) as sock:
        replies = _each_answered(sock, [increment] * 4)
        sock.sendall(increment * 5 + _post(f"{COUNTER}/decrement", bearer, b'{"value": 2}') * 3)
        replies += _replies(sock, 8)
    assert [status for status, _, _ in replies] == [200] * 12
    bodies = [reply for _, _, reply in replies]
    assert bodies == [b'{"success":true,"current_value":%d}' % n for n in (2, 4, 6, 8, 10, 12, 14, 16, 18, 16, 14, 12)]
    assert all(_same_but_date(replies[0][1], headers) for _, headers, _ in replies)
    assert _value(web) == 12


def test_an_update_sent_again_past_the_counters_limit_is_refused_as_the_first_time(builtins, bearer, make_counter):
    """A kept update whose script call is not a plain OK (here the limit) is finished by the
    general code and refused with the error the first refusal had; nothing changes."""
    make_counter("capped", max_value=5, public=True)
    path = "/api/v1/counter/capped"
    web = Gunicorn(workers=1, env=PRODUCTION_CHECKS)
    try:
        with _connect(web) as sock:
            replies = _each_answered(sock, [_post(f"{path}/increment", bearer, b'{"value": 2}')] * 5)
        value = requests.get(f"{web.url}{path}", timeout=10).json()["value"]
    finally:
        web.stop()
    assert [status for status, _, _ in replies] == [200, 200, 409, 409, 409]
    assert replies[1][2] == b'{"success":true,"current_value":4}'
    assert b'"code":4005' in replies[2][2] and replies[2][2] == replies[3][2] == replies[4][2]
    assert _same_but_date(replies[2][1], replies[4][1])
    assert value == 4


def test_sigterm_lets_an_update_sent_again_finish_while_redis_is_slow(builtins, bearer, private_redis):
    """An update answered from its script call's callback has no task: a graceful shutdown still
    waits for its reply (its connection is still answering), then the worker exits."""
    env = {"TEST_REDIS_URL": private_redis.url, "REDIS_SOCKET_TIMEOUT": "30", **PRODUCTION_CHECKS}
    web = Gunicorn(workers=1, env=env)
    try:
        increment = _post(f"{COUNTER}/increment", bearer, b'{"value": 1}')
        with _connect(web) as sock:
            for n in (1, 2):  # the second pass keeps a plan
                sock.sendall(increment)
                assert _replies(sock, 1)[0][2].endswith(b":%d}" % n)
            private_redis.freeze()
            try:
                sock.sendall(increment)
                time.sleep(0.5)  # read by the worker, its call waiting on Redis
                web.process.send_signal(signal.SIGTERM)
                time.sleep(1)
                assert web.process.poll() is None  # waiting for the reply
            finally:
                private_redis.thaw()
            [(status, headers, reply)] = _replies(sock, 1)
            assert sock.recv(100) == b""  # then closed, as a shutdown closes a connection
        assert web.process.wait(timeout=30) == 0
    finally:
        web.stop()
    assert (status, reply) == (200, b'{"success":true,"current_value":3}')
    assert headers["connection"] == "close"


def test_logins_sent_again_are_answered_as_the_first_was(checked_each_second, bearer):
    """A login or logout sent again by the same key (a login plan: a new user each time) is sent as
    its request completes and answered from its script call's callback; a body the plan cannot
    take is refused as on its first pass, and changes nothing."""
    web = checked_each_second
    path = "/api/v1/counter/online_players"
    logins = [_post(f"{path}/increment", bearer, b'{"user_id": "p%d"}' % n) for n in range(6)]
    refused = [
        _post(f"{path}/increment", bearer, b'{"user_id": ""}'),
        _post(f"{path}/increment", bearer, b"{"),
        _post(f"{path}/increment", bearer, b'{"user_id": "p9", "value": 2}'),
    ]
    logouts = [_post(f"{path}/decrement", bearer, b'{"user_id": "p%d"}' % n) for n in (0, 1, 0)]
    with _connect(web) as sock:
        replies = _each_answered(sock, logins[:3] + refused + logins[3:] + refused + logouts)
    statuses = [status for status, _, _ in replies]
    assert statuses == [200] * 3 + [400, 400, 409] + [200] * 3 + [400, 400, 409] + [200] * 3
    counts = [reply for status, _, reply in replies if status == 200]
    assert counts == [b'{"success":true,"current_value":%d}' % n for n in (1, 2, 3, 4, 5, 6, 5, 4, 4)]
    assert [reply for _, _, reply in replies[3:6]] == [reply for _, _, reply in replies[9:12]]
    assert all(_same_but_date(replies[0][1], headers) for _, headers, _ in replies[:3] + replies[6:9])
    assert requests.get(f"{web.url}{path}", timeout=10).json()["value"] == 4
