"""The real server process over real sockets: every route, both dialects, bad input."""

from __future__ import annotations

import contextlib
import json
import math
import re
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from embedserve.encoding import decode_float32_base64
from embedserve.hashing import HashEmbedder

from conftest import Server, server_env, start_server

EMBEDDER = HashEmbedder(384)
TEXTS = ["The cat sat on the mat.", "Feature hashing is deterministic", "naïve café ☕"]


def assert_alive(srv: Server) -> None:
    status, _, body = srv.request("GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    status, _, body = srv.request("POST", "/embed", {"inputs": "still serving"})
    assert status == 200 and body == [EMBEDDER.embed_one("still serving")]


# --- routes -------------------------------------------------------------------------------

def test_health(server: Server) -> None:
    status, headers, body = server.request("GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    assert headers["content-type"] == "application/json"


def test_info_describes_backend_and_limits(server: Server) -> None:
    status, _, info = server.request("GET", "/info")
    assert status == 200
    assert info["backend"] == "hash" and info["model"] == "hash-v1-384"
    assert info["dimensions"] == 384 and info["device"] == "cpu"
    assert info["max_batch_size"] == 2048 and info["supervisor_pid"] == server.pid
    assert info["pid"] != server.pid and info["workers"] == 1 and info["restarts"] == 0
    assert info["version"] and "max_input_tokens" in info
    assert info["skipped_backends"] == {}  # hash was asked for: nothing was tried first
    assert info["model_id"] == info["model"]


def test_models_lists_the_served_model(server: Server) -> None:
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["hash-v1-384"]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings"])
def test_openai_float(server: Server, path: str) -> None:
    status, _, body = server.request("POST", path, {"input": TEXTS, "model": "hash-v1-384",
                                                   "encoding_format": "float", "user": "u1"})
    assert status == 200
    assert body["object"] == "list" and body["model"] == "hash-v1-384"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert [d["embedding"] for d in body["data"]] == EMBEDDER.embed(TEXTS)
    tokens = sum(EMBEDDER.embed_with_counts(TEXTS)[1])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_openai_default_is_float_and_single_string_works(server: Server) -> None:
    status, _, body = server.request("POST", "/v1/embeddings", {"input": "one text"})
    assert status == 200 and body["data"][0]["embedding"] == EMBEDDER.embed_one("one text")


def test_openai_base64_is_little_endian_float32(server: Server) -> None:
    status, _, body = server.request("POST", "/v1/embeddings",
                                     {"input": TEXTS, "encoding_format": "base64"})
    assert status == 200
    for item, expected in zip(body["data"], EMBEDDER.embed(TEXTS)):
        decoded = decode_float32_base64(item["embedding"])
        assert len(decoded) == 384
        assert max(abs(a - b) for a, b in zip(decoded, expected)) < 1e-7


@pytest.mark.parametrize("path,key", [("/embed", "inputs"), ("/", "inputs")])
def test_tei_embed(server: Server, path: str, key: str) -> None:
    status, _, body = server.request("POST", path, {key: TEXTS})
    assert status == 200 and body == EMBEDDER.embed(TEXTS)
    status, _, body = server.request("POST", path, {key: TEXTS[0]})
    assert status == 200 and body == [EMBEDDER.embed_one(TEXTS[0])]


def test_tei_normalize_false_gives_raw_weights(server: Server) -> None:
    status, _, body = server.request("POST", "/embed", {"inputs": "a a b", "normalize": False})
    assert status == 200 and body == [EMBEDDER.embed_one("a a b", normalize=False)]
    assert any(abs(x) > 1 for x in body[0])


@pytest.mark.parametrize("dims", [1, 64, 383, 384])
def test_hash_dimensions_hash_into_that_many_buckets(server: Server, dims: int) -> None:
    # Not the first `dims` of 384 values: hash features have no order of importance, so
    # those would be mostly zeros. The hash tier computes hash-v1-<dims> directly.
    status, _, body = server.request("POST", "/v1/embeddings",
                                     {"input": TEXTS[0], "dimensions": dims})
    vector = body["data"][0]["embedding"]
    assert status == 200 and vector == HashEmbedder(dims).embed_one(TEXTS[0])
    assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-9)
    status, _, body = server.request("POST", "/embed", {"inputs": TEXTS[0], "dimensions": dims})
    assert status == 200 and body == [vector]


def test_keep_alive_serves_many_requests_on_one_connection(server: Server) -> None:
    import http.client
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        for i in range(50):
            conn.request("POST", "/embed", body=json.dumps({"inputs": f"text {i}"}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read()) == [EMBEDDER.embed_one(f"text {i}")]
            assert response.getheader("Connection") != "close"
    finally:
        conn.close()


def test_golden_vectors_over_http(server: Server) -> None:
    from test_hashing import GOLDEN
    cases = [c for c in GOLDEN["cases"] if c["dimensions"] == 384 and c["text"]]
    status, _, body = server.request("POST", "/embed", {"inputs": [c["text"] for c in cases]})
    assert status == 200 and body == [c["vector"] for c in cases]
    status, _, body = server.request("POST", "/v1/embeddings", {
        "input": [c["text"] for c in cases], "encoding_format": "base64"})
    assert [d["embedding"] for d in body["data"]] == [c["float32_base64"] for c in cases]


def test_two_server_processes_give_identical_vectors(server: Server,
                                                     fresh_server: list[Server]) -> None:
    other = start_server(env=server_env(PYTHONHASHSEED="4242"))
    fresh_server.append(other)
    texts = [f"document number {i} about {w}" for i, w in enumerate(["cats", "dogs", "ƒ"] * 30)]
    _, _, a = server.request("POST", "/embed", {"inputs": texts})
    _, _, b = other.request("POST", "/embed", {"inputs": texts})
    assert a == b and len(a) == 90


# --- bad input: right status, JSON error in the dialect's shape, server keeps serving ----

OPENAI_BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b'["a list"]', 400, "JSON object"),
    (b'{"input": 5}', 400, "string or a list"),
    (b'{"input": ["ok", 5]}', 400, "input[1]"),
    (b'{"input": [[1, 2, 3]]}', 400, "token ids"),
    (b'{"input": [1, 2, 3]}', 400, "token ids"),
    (b'{"input": []}', 400, "empty"),
    (b'{"input": ""}', 400, "empty"),
    (b'{"input": ["a", ""]}', 400, "empty"),
    (b'{}', 400, "required"),
    (b'{"input": "x", "encoding_format": "int8"}', 400, "encoding_format"),
    (b'{"input": "x", "dimensions": "8"}', 400, "dimensions"),
    (b'{"input": "x", "dimensions": true}', 400, "dimensions"),
    (b'{"input": "x", "dimensions": 0}', 422, "between 1 and 384"),
    (b'{"input": "x", "dimensions": 385}', 422, "between 1 and 384"),
    (b'{"input": "x", "model": 3}', 400, "model"),
    (b'{"input": NaN}', 400, "JSON"),
    (b"\xff\xfe{}", 400, "UTF-8"),
]


@pytest.mark.parametrize("raw,status,fragment", OPENAI_BAD, ids=[r[0][:24].decode(
    "latin-1") for r in OPENAI_BAD])
def test_openai_bad_input(server: Server, raw: bytes, status: int, fragment: str) -> None:
    got, headers, body = server.request("POST", "/v1/embeddings", raw=raw)
    assert got == status
    assert headers["content-type"] == "application/json"
    error = body["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert_alive(server)


TEI_BAD = [
    (b'{"inputs": []}', 400, "Empty"),
    (b'{"inputs": ["a", ""]}', 400, "Empty"),
    (b'{"inputs": "x", "empty": 1, "empty": 2}', 400, "Validation"),  # not by its words
    (b'{"inputs": 3}', 400, "Validation"),
    (b'{"inputs": "x", "normalize": "yes"}', 400, "Validation"),
    (b'{"inputs": "x", "truncation_direction": "Up"}', 422, "Validation"),
    (b'{"inputs": "x", "prompt_name": "query"}', 422, "Validation"),
    (b'{"inputs": "x", "dimensions": 9999}', 422, "Validation"),
    (b'nope', 400, "Validation"),
]


@pytest.mark.parametrize("raw,status,error_type", TEI_BAD)
def test_tei_bad_input(server: Server, raw: bytes, status: int, error_type: str) -> None:
    got, _, body = server.request("POST", "/embed", raw=raw)
    assert got == status
    assert body["error_type"] == error_type and body["error"]
    assert_alive(server)


def test_too_many_inputs_is_413(fresh_server: list[Server]) -> None:
    srv = start_server("--max-batch-size", "4")
    fresh_server.append(srv)
    status, _, body = srv.request("POST", "/v1/embeddings", {"input": ["x"] * 5})
    assert status == 413 and "limit is 4" in body["error"]["message"]
    status, _, body = srv.request("POST", "/embed", {"inputs": ["x"] * 5})
    assert status == 413 and body["error_type"] == "Validation"
    assert srv.request("POST", "/embed", {"inputs": ["x"] * 4})[0] == 200
    assert_alive(srv)


def test_body_over_the_limit_is_413(fresh_server: list[Server]) -> None:
    srv = start_server("--max-body-bytes", "1000")
    fresh_server.append(srv)
    status, headers, body = srv.request("POST", "/v1/embeddings", {"input": "x" * 2000})
    assert status == 413 and "limit is 1000" in body["error"]["message"]
    assert headers.get("connection") == "close"
    assert_alive(srv)


def test_unknown_route_is_404_json(server: Server) -> None:
    status, _, body = server.request("GET", "/nope")
    assert status == 404 and body["error_type"] == "NotFound"
    status, _, body = server.request("POST", "/v1/nope", {"input": "x"})
    assert status == 404 and body["error"]["code"] == "not_found"
    # A model not served is OpenAI's model_not_found, not a missing route.
    status, _, body = server.request("POST", "/v1/embeddings", {"input": "x", "model": "gpt"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"
    assert_alive(server)


def test_wrong_method_is_405_with_allow(server: Server) -> None:
    status, headers, body = server.request("GET", "/v1/embeddings")
    assert status == 405 and headers["allow"] == "POST" and "error" in body
    status, headers, _ = server.request("POST", "/health", {})
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, _, _ = server.request("DELETE", "/embed")
    assert status == 405
    assert_alive(server)


def raw_exchange(srv: Server, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def split_response(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def read_head(sock: socket.socket) -> bytes:
    """One response head (through its blank line), read byte by byte so nothing after it
    is taken."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {head!r}"
        head += byte
    return head


# A value's blanks either side are not part of it (RFC 9110 5.5); the stdlib kept the
# trailing ones, and its client then waited for a 100 that never came.
@pytest.mark.parametrize("expect", [b"100-continue", b"100-Continue \t", b"\t100-continue  "])
def test_expect_100_continue_is_answered_when_the_body_is_wanted(server: Server,
                                                                 expect: bytes) -> None:
    body = json.dumps({"inputs": "sent after the 100"}).encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nExpect:" + expect + b"\r\nContent-Length: %d\r\n"
                     b"\r\n" % len(body))
        assert read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        head = read_head(sock)
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore
        answer = b""
        while len(answer) < length:
            answer += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(answer) == [EMBEDDER.embed_one("sent after the 100")]


@pytest.mark.parametrize("refusal", ["401", "413", "404"])
def test_a_refused_request_is_answered_before_its_body_is_sent(refusal: str,
                                                               fresh_server: list[Server]
                                                               ) -> None:
    """An "Expect: 100-continue" client waits for the 100 before it sends its body: a
    request the server refuses anyway is answered at once, without a 100 and without
    waiting for (or reading) the body, and the connection then closes."""
    srv = start_server("--api-key", "k", "--max-body-bytes", "1000")
    fresh_server.append(srv)
    path, length, auth = {"401": (b"/embed", 100, b""),
                          "413": (b"/embed", 5000, b"Authorization: Bearer k\r\n"),
                          "404": (b"/nowhere", 100, b"Authorization: Bearer k\r\n")}[refusal]
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nExpect: 100-continue\r\n" + auth +
                     b"Content-Length: %d\r\n\r\n" % length)
        head = read_head(sock)  # no body sent: a server waiting for it would time out here
    assert head.startswith(b"HTTP/1.1 " + refusal.encode()), head
    assert b"Connection: close" in head
    assert srv.request("GET", "/health")[0] == 200


def test_missing_content_length_is_411(server: Server) -> None:
    reply = raw_exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Type: application/json\r\n\r\n")
    status, body = split_response(reply)
    assert status == 411 and "Content-Length" in body["error"]
    assert_alive(server)


def test_chunked_body_is_accepted(server: Server) -> None:
    payload = json.dumps({"inputs": "chunked text"}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 7]), payload[i:i + 7])
                      for i in range(0, len(payload), 7))
    reply = raw_exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    status, body = split_response(reply)
    assert status == 200 and body == [EMBEDDER.embed_one("chunked text")]


def test_malformed_request_line_gets_json_not_html(server: Server) -> None:
    reply = raw_exchange(server, b"GARBAGE\r\n\r\n")
    status, body = split_response(reply)
    assert status == 400 and "error" in body
    assert b"<html" not in reply.lower()
    assert_alive(server)


def test_slow_client_is_cut_off_and_others_are_served(fresh_server: list[Server]) -> None:
    srv = start_server("--request-timeout", "1", "--keep-alive-timeout", "1")
    fresh_server.append(srv)
    with socket.create_connection((srv.host, srv.port), timeout=10) as slow:
        slow.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        assert_alive(srv)  # served while the slow one hangs
        start = time.monotonic()
        reply = slow.recv(65536)
        assert split_response(reply)[0] == 408
        assert b"Connection: close" in reply
        assert slow.recv(1024) == b""  # closed by the server, not by us
        assert time.monotonic() - start < 5
    with socket.create_connection((srv.host, srv.port), timeout=10) as idle:
        assert idle.recv(1024) == b""  # an idle keep-alive connection is closed too
    assert_alive(srv)


def test_connection_limit_answers_503(fresh_server: list[Server]) -> None:
    srv = start_server("--max-connections", "2")
    fresh_server.append(srv)
    # Two connections in the middle of a request: busy, not idle, so nothing can be closed.
    holders = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(b"GET /hea")
        time.sleep(0.2)
        reply = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, body = split_response(reply)
        assert status == 503 and body["error_type"] == "Overloaded"
    finally:
        for sock in holders:
            sock.close()
    # Slots free up as the server's threads see the closed connections (each request
    # below uses a fresh connection, which holds a slot until its thread has noticed). A
    # refusal may also reset a connection before its request is sent: retry those too.
    deadline = time.monotonic() + 10
    served = False
    while not served and time.monotonic() < deadline:
        try:
            status, _, body = srv.request("POST", "/embed", {"inputs": "still serving"})
        except OSError:
            status = 0
        served = status == 200 and body == [EMBEDDER.embed_one("still serving")]
        time.sleep(0.05)
    assert served


def test_idle_connections_make_room_at_the_limit(fresh_server: list[Server]) -> None:
    # Connections that send nothing (or sit idle between keep-alive requests) cannot lock
    # real clients out: at the limit the longest idle one is closed for the newcomer.
    srv = start_server("--max-connections", "2", "--keep-alive-timeout", "60")
    fresh_server.append(srv)
    idle = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)
        for attempt in range(3):
            status, _, body = srv.request("POST", "/embed", {"inputs": "let me in"})
            assert status == 200 and body == [EMBEDDER.embed_one("let me in")]
        assert idle[0].recv(1024) == b""  # the oldest idle connection was closed
    finally:
        for sock in idle:
            sock.close()


def test_clients_stalled_mid_request_make_room_at_the_limit(fresh_server: list[Server]) -> None:
    # Slowloris: connections that send a request a byte at a time held every slot for the
    # whole request timeout (503 to everyone else). At the limit, one stalled past
    # STALLED_GRACE (2 s) is closed for a newcomer: a cut head, a cut body, and a client
    # that does not take its answers (pipelined requests for some 30 MB of them).
    srv = start_server("--max-connections", "1")
    fresh_server.append(srv)
    big = json.dumps({"input": ["a few words"] * 2048}).encode()
    unread = (b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)) * 10
    for cut in (b"GET /health HTTP/1.1\r\nHost: localhost\r\n",
                b"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                b"\r\nContent-Length: 20\r\n\r\n{", unread):
        with socket.create_connection((srv.host, srv.port), timeout=10) as stalled:
            stalled.sendall(cut)
            time.sleep(0.2)
            # Within the grace it is a client on a slow network: the newcomer waits its turn.
            status, _ = split_response(raw_exchange(srv, b"GET /health HTTP/1.1\r\n"
                                                         b"Host: localhost\r\n\r\n"))
            assert status == 503
            time.sleep(2.2)
            # Past it (counted from when the server began to wait on it: for the unread
            # answers, once its buffers are full), the newcomer gets in.
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError):
                    status, _, body = srv.request("POST", "/embed", {"inputs": "let me in"})
                    if status == 200:
                        break
                assert time.monotonic() < deadline, "the stalled connection was never closed"
                time.sleep(0.2)
            assert body == [EMBEDDER.embed_one("let me in")]
            if cut is not unread:
                assert stalled.recv(1024) == b""  # closed for it
            else:  # what it had been sent, then the end (a reset: requests were unread)
                with contextlib.suppress(ConnectionResetError):
                    while stalled.recv(1 << 20):
                        pass
        time.sleep(0.3)  # the newcomer's connection, closed, is noticed


def test_a_request_line_cut_short_gets_a_whole_408(fresh_server: list[Server]) -> None:
    # Before: no answer and a traceback (no request line, no command yet); after a HEAD on
    # the same connection, a 408 whose body was left out as the HEAD's had been.
    srv = start_server("--request-timeout", "1")
    fresh_server.append(srv)
    for before in (b"", b"HEAD /health HTTP/1.1\r\nHost: localhost\r\n\r\n"):
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.sendall(before + b"GE")
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        answers = reply.split(b"HTTP/1.1 ")[1:]
        assert len(answers) == (2 if before else 1), reply
        head, _, body = answers[-1].partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        assert head.startswith(b"408 ") and length == len(body) > 0, reply
        assert b"request_timeout" in body
    assert not any("Traceback" in line for line in srv.log)


def test_an_answer_in_parts_arrives_whole_and_in_order_through_a_slow_reader() -> None:
    # send_within writes head and body as they are (no joined copy of a big answer): a
    # send that takes part of a part must go on from the byte where it stopped.
    from embedserve.connections import send_within

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    parts = [b"head" * 300, b"", bytes(range(256)) * 4000, b"tail"]
    received = bytearray()

    def read_slowly() -> None:
        while chunk := theirs.recv(7000):
            received.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        send_within(ours, 30, *parts)
    finally:
        ours.close()
        reader.join(30)
        theirs.close()
    assert bytes(received) == b"".join(parts)


def test_a_connection_past_a_stray_line_end_is_idle_not_stalled() -> None:
    # After a stray line end (some clients send one after a body) the connection waits for
    # its next request: idle, closable at once at the limit. It was also left marked
    # stalled, and the limit could take it from each mark, counting two freed places.
    from embedserve.config import Config
    from embedserve.server import EmbedServer
    from embedserve.service import EmbeddingService

    service = EmbeddingService(Config(backend="hash", keep_alive_timeout=30))
    service.load()
    server = EmbedServer(socket.create_server(("127.0.0.1", 0)), service)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.socket.getsockname(), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n\r\n")
            assert read_head(sock).startswith(b"HTTP/1.1 200")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with server._lock:
                    marks = len(server._waiting), len(server._stalled)
                if marks[0]:
                    break
                time.sleep(0.01)
            with server._lock:
                assert (len(server._waiting), len(server._stalled)) == (1, 0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_slowloris_is_bounded_by_the_request_deadline(fresh_server: list[Server]) -> None:
    # A socket timeout restarts with every byte; the deadline covers the whole request.
    srv = start_server("--request-timeout", "1.5")
    fresh_server.append(srv)
    with socket.create_connection((srv.host, srv.port), timeout=10) as slow:
        started = time.monotonic()
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 200
        reply = b""
        for byte in request:  # one byte every 0.1 s: 20 s in all if never cut off
            readable, _, _ = select.select([slow], [], [], 0.1)
            try:
                if readable:
                    reply = slow.recv(65536)
                    break
                slow.sendall(bytes([byte]))
            except OSError:  # reset: cut off without an answer
                break
        cut_after = time.monotonic() - started
    assert not reply or split_response(reply)[0] == 408
    assert cut_after < 10, f"a trickling client held its connection for {cut_after:.1f} s"
    assert_alive(srv)


def test_a_client_that_never_reads_its_answer_is_cut_off_by_the_request_deadline(
        fresh_server: list[Server]) -> None:
    """A response the client does not take is given up after --request-timeout, so a reader
    that never reads cannot hold a server thread; the connection then just closes (an error
    answer written after part of a response would be read as the rest of its body)."""
    srv = start_server("--request-timeout", "1.5", "--dimensions", "1024")
    fresh_server.append(srv)
    # About 12 MB of float JSON: more than the socket buffers of both ends hold.
    body = json.dumps({"inputs": [f"text number {i} of many" for i in range(2048)]}).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.settimeout(30)
        reader.connect((srv.host, srv.port))
        reader.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        sent = time.monotonic()
        assert srv.request("GET", "/health")[0] == 200  # meanwhile others are served
        # Not reading: the server's send waits, gives up at 1.5 s, and closes. Reading from
        # 2 s on frees the buffers while an error answer, if one were tried, could go out.
        time.sleep(max(0.0, sent + 2.0 - time.monotonic()))
        received = bytearray()
        try:
            while chunk := reader.recv(1 << 20):
                received += chunk
        except ConnectionResetError:
            pass
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    assert len(rest) < length, "the whole response went out to a client that never read"
    assert b"HTTP/1.1" not in rest, "another answer was written into the body"
    assert srv.request("GET", "/health")[0] == 200


def test_concurrency_limit_answers_429(fresh_server: list[Server]) -> None:
    srv = start_server("--max-concurrent-requests", "1")
    fresh_server.append(srv)
    big = {"inputs": [("lorem ipsum dolor %d " % i) * 150 for i in range(1500)]}
    result: dict[str, int] = {}

    def send_big() -> None:
        result["big"] = srv.request("POST", "/embed", big, )[0]

    thread = threading.Thread(target=send_big)
    thread.start()
    seen: list[tuple[int, dict, object]] = []
    while thread.is_alive() and len(seen) < 2000:
        status, headers, body = srv.request("POST", "/v1/embeddings", {"input": "small"})
        seen.append((status, headers, body))
        if status == 429:
            break
    thread.join(60)
    statuses = {s for s, _, _ in seen}
    assert result["big"] == 200
    assert 429 in statuses, "the big request never overlapped a small one"
    status, headers, body = next(x for x in seen if x[0] == 429)
    assert headers["retry-after"] == "1" and body["error"]["type"] == "rate_limit_error"
    assert_alive(srv)


def test_api_key(fresh_server: list[Server]) -> None:
    srv = start_server("--api-key", "s3cret")
    fresh_server.append(srv)
    assert srv.request("GET", "/health")[0] == 200  # open for load balancers
    status, headers, body = srv.request("POST", "/v1/embeddings", {"input": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer nope"}
    assert srv.request("GET", "/info", headers=wrong)[0] == 401
    right = {"Authorization": "Bearer s3cret"}
    assert srv.request("POST", "/v1/embeddings", {"input": "x"}, headers=right)[0] == 200
    # Two keys, the right one first: which counts would be a guess (the first was taken).
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret"
                     b"\r\nAuthorization: Bearer nope\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"more than one Authorization" in answer


def test_a_non_ascii_api_key_matches_its_utf_8_bytes(fresh_server: list[Server]) -> None:
    # What curl and browsers send for it; the key was compared with the header re-encoded.
    srv = start_server("--api-key", "ключ")
    fresh_server.append(srv)
    for key, status in (("ключ".encode(), b"200"), ("ключ".encode("cp1251"), b"401")):
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                         b"Authorization: Bearer " + key + b"\r\n\r\n")
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


# --- process behaviour ---------------------------------------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedserve", *args], capture_output=True,
                          text=True, env=env or server_env(), timeout=60)


@pytest.mark.parametrize("args,fragment", [
    (["--port", "-1"], "port must be at least 0"),
    (["--port", "70000"], "port must be at most 65535"),  # an OverflowError traceback before
    (["--host", "999.1.1.1"], "is not an IPv4 address"),  # "refusing ... without an API key"
    (["--worker-timeout", "nan"], "worker_timeout must be a number"),  # hang checks off
    (["--backend", "onnx"], "invalid choice"),
    (["--dimensions", "0"], "dimensions must be at least 1"),
    # A worker crash at every start, restarted for ever; a traceback from listen().
    (["--dimensions", "100000000000000000000"], "dimensions must be at most 65536"),
    (["--backlog", "3000000000"], "backlog must be at most 65535"),
    (["--max-body-bytes", "lots"], "invalid int value"),
])
def test_bad_flags_exit_2_with_a_message(args: list[str], fragment: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2 and fragment in done.stderr


def test_bad_env_var_exits_2_with_its_name() -> None:
    done = run_cli(env=server_env(EMBEDSERVE_PORT="eighty"))
    assert done.returncode == 2 and "EMBEDSERVE_PORT" in done.stderr


def test_env_var_sets_an_option_and_the_flag_wins(fresh_server: list[Server]) -> None:
    srv = start_server(env=server_env(EMBEDSERVE_DIMENSIONS="32", EMBEDSERVE_MAX_BATCH_SIZE="7"))
    fresh_server.append(srv)
    info = srv.request("GET", "/info")[2]
    assert info["dimensions"] == 32 and info["max_batch_size"] == 7
    srv2 = start_server("--dimensions", "48", env=server_env(EMBEDSERVE_DIMENSIONS="32"))
    fresh_server.append(srv2)
    assert srv2.request("GET", "/info")[2]["dimensions"] == 48


def test_port_in_use_is_a_clear_error(server: Server) -> None:
    done = run_cli("--port", str(server.port))
    assert done.returncode == 1 and "cannot listen" in done.stderr


def test_sigterm_exits_0(fresh_server: list[Server]) -> None:
    srv = start_server()
    fresh_server.append(srv)
    assert_alive(srv)
    assert srv.stop() == 0
