"""A hostile client against the real server: framing tricks, slow and abandoned sockets,
floods, label injection, deep nesting, browsers on other origins. Each test failed before
the fix it pins."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import random
import select
import socket
import string
import threading
import time

import pytest

from embedserve.hashing import HashEmbedder
from embedserve.httphead import read_header_lines

from conftest import Server, request, start_server
from test_metrics import requests_of, scrape_until

EMBEDDER = HashEmbedder(384)
JSON = b"Content-Type: application/json\r\n"


def connect(srv: Server) -> socket.socket:
    return socket.create_connection((srv.host, srv.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (Content-Length framed) from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def exchange(srv: Server, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(srv) as sock:
        sock.sendall(data)
        return read_response(sock)


def closed_by_server(sock: socket.socket, timeout: float = 5) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def assert_serving(srv: Server) -> None:
    status, _, body = srv.request("POST", "/embed", {"inputs": "still serving"})
    assert status == 200 and body == [EMBEDDER.embed_one("still serving")]


# -- framing: lengths, chunks, smuggling ------------------------------------------------------

def test_negative_chunk_size_is_refused_not_read_forever(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                     b"Transfer-Encoding: chunked\r\n\r\n-1\r\n")
        # Before: int("-1", 16) read the body without end; keep feeding it to show it.
        status, headers, _ = read_response(sock)
        assert status == 400 and headers.get("connection") == "close"
    assert_serving(server)


@pytest.mark.parametrize("value", [b"+20", b"2 0", b"2_0", b"0x14", b"-0", b"\xd9\xa2"])
def test_content_length_is_digits_only(server: Server, value: bytes) -> None:
    body = b'{"inputs": "twenty chars"}'[:20]
    status, headers, reply = exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" +
                                      JSON + b"Content-Length: " + value + b"\r\n\r\n" + body)
    assert status == 400 and b"Content-Length" in reply
    assert headers.get("connection") == "close"


def test_odd_but_readable_requests_get_answers_in_plain_words(server: Server) -> None:
    # A byte order mark before the JSON is ignored, as RFC 8259 allows (it was a 400 that
    # advised "decode using utf-8-sig"); a raw UTF-8 path is quoted as sent, not as
    # Latin-1; a bad chunk size is quoted, not shown as Python bytes; an HTTP version we
    # do not speak is the client's error in TEI's types too, not "Backend".
    body = b"\xef\xbb\xbf" + b'{"inputs":"x"}'
    status, _, reply = exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                                b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status == 200 and json.loads(reply) == [EMBEDDER.embed_one("x")]
    status, _, reply = exchange(server, "GET /héllo HTTP/1.1\r\nHost: localhost\r\n\r\n"
                                .encode())
    assert status == 404 and json.loads(reply)["error"].startswith("no route '/héllo'")
    status, _, reply = exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                                b"Transfer-Encoding: chunked\r\n\r\n-e\r\n")
    assert status == 400 and json.loads(reply)["error"].endswith("invalid chunk size '-e'")
    status, _, reply = exchange(server, b"GET /health HTTP/2.0\r\nHost: localhost\r\n\r\n")
    assert status == 505 and json.loads(reply)["error_type"] == "Validation"


@pytest.mark.parametrize("line", [
    b"GET /health\x00x HTTP/1.1", b"GET /he\x7flth HTTP/1.1", b"GET\t/health\tHTTP/1.1",
    b"GET  /health HTTP/1.1", b"GET /health HTTP/01.1", b"GET /health HTTP/1.10", b"GET /health",
])
def test_a_request_line_that_is_not_method_target_version_is_400(server: Server,
                                                                 line: bytes) -> None:
    # The stdlib took each of these (a control character in the target made a 404; the
    # two-word line is HTTP/0.9, which it served).
    with connect(server) as sock:
        sock.sendall(line + b"\r\nHost: localhost\r\n\r\n")
        status, headers, reply = read_response(sock)
        assert status == 400 and b"malformed request line" in reply
        assert headers.get("connection") == "close" and closed_by_server(sock)


def test_spaces_around_a_content_length_are_not_part_of_it(server: Server) -> None:
    # RFC 9110 5.5 (a 400 "invalid Content-Length '14 '" before).
    body = b'{"inputs":"x"}'
    status, _, reply = exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                                b"Content-Length:  14 \t\r\n\r\n" + body)
    assert status == 200 and json.loads(reply) == [EMBEDDER.embed_one("x")]


def test_transfer_encoding_in_http_1_0_is_faulty_framing(server: Server) -> None:
    # RFC 9112 6.1: HTTP/1.0 has no chunked framing; a 1.0 proxy in front would read the
    # body otherwise (both requests were answered on one connection before).
    smuggled = b"GET /health HTTP/1.0\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.0\r\nConnection: keep-alive\r\n" + JSON +
                     b"Transfer-Encoding: chunked\r\n\r\ne\r\n{\"input\":\"hi\"}\r\n0\r\n\r\n" +
                     smuggled)
        status, headers, _ = read_response(sock)
        assert status == 400 and headers.get("connection") == "close"
        assert closed_by_server(sock)


@pytest.mark.parametrize("connection", [b"Connection: TE, close\r\n",
                                        b"Connection: close, keep-alive\r\n",
                                        b"Connection: keep-alive\r\nConnection: Close\r\n"])
def test_close_among_the_connection_options_closes(server: Server, connection: bytes) -> None:
    # The options are a list, over one or more headers (only "close" alone closed before).
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + connection + b"\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") == "close"
        assert closed_by_server(sock)


def test_http_1_0_keep_alive_is_said_in_the_answer(server: Server) -> None:
    # An HTTP/1.0 client keeps a connection only when the answer says so; without it, it
    # waits for a close that came only after the idle timeout.
    with connect(server) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection") == "keep-alive"
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") == "close"
        assert closed_by_server(sock)


def test_empty_lines_before_a_request_line_are_skipped(server: Server) -> None:
    # RFC 9112 2.2 (the connection was closed without an answer before).
    status, _, _ = exchange(server, b"\r\n\nGET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200
    body = b'{"inputs":"x"}'
    with connect(server) as sock:
        # A stray line end after a POST's body, then the next request: both answered...
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                     b"Content-Length: 14\r\n\r\n" + body + b"\r\n")
        assert read_response(sock)[0] == 200
        time.sleep(0.2)  # ...however late the next one comes
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock)[0] == 200
    status, headers, _ = exchange(server, b"\r\n" * 9 + b"GET /health HTTP/1.1\r\n\r\n")
    assert status == 400 and headers.get("connection") == "close"  # but not without end


@pytest.mark.parametrize("size", [b"+e", b"0xe", b" e", b"e ", b"0_e", b"f" * 19])
def test_chunk_size_is_hex_digits_only(server: Server, size: bytes) -> None:
    payload = b'{"inputs":"x"}'  # 0xe bytes: every size above but the last reads as 14
    status, _, reply = exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                                b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" +
                                payload + b"\r\n0\r\n\r\n")
    assert status == 400 and b"chunk size" in reply


def test_chunked_body_limit_holds(fresh_server: list[Server]) -> None:
    srv = start_server("--max-body-bytes", "1000")
    fresh_server.append(srv)
    chunk = b"%x\r\n%s\r\n" % (400, b" " * 400)
    with connect(srv) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3)
        status, headers, _ = read_response(sock)
    assert status == 413 and headers.get("connection") == "close"
    # Chunk extensions and trailer fields are read as well: they count.
    for framing in (b"1;" + b"x" * 1000 + b"\r\n{\r\n",
                    b"0\r\n" + (b"X: " + b"y" * 100 + b"\r\n") * 20):
        with connect(srv) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                         b"Transfer-Encoding: chunked\r\n\r\n" + framing)
            status, headers, _ = read_response(sock)
        assert status == 413 and headers.get("connection") == "close", framing


@pytest.mark.parametrize("framing", [
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
    b"Content-Length: 3\r\nContent-Length: 30\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\xa0\r\n",  # blanks but space and tab are not trimmed:
    b"Transfer-Encoding: \x85chunked\r\n",  # to a proxy, an unknown coding
    b"Host: evil.example\r\nContent-Length: 0\r\n",
])
def test_ambiguous_framing_is_400_and_closes(server: Server, framing: bytes) -> None:
    # RFC 9112 6.3: a message two parties could frame differently is refused and its
    # connection closed, so nothing after it can be read as another request.
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON + framing +
                     b"\r\n0\r\n\r\n" + smuggled)
        status, headers, _ = read_response(sock)
        assert status == 400 and headers.get("connection") == "close"
        assert closed_by_server(sock)  # no second response: the smuggled GET never ran


@pytest.mark.parametrize("line", [
    b"X\r\n",                         # no colon: the stdlib ended the head here
    b"Content Length: 46\r\n",        # a space in the name: likewise
    b"X: a\rY: b\r\n",                 # a bare CR: the stdlib split the line at it
    b"X: a\r\n folded\r\n",           # obs-fold: the stdlib joined the lines
    b"X: a\x00b\r\n",                 # a control character in a value
])
def test_header_lines_a_proxy_could_read_otherwise_are_400_and_close(server: Server,
                                                                   line: bytes) -> None:
    # A proxy in front may keep such a line as one header (or refuse it); either way the
    # server must not find a different request in it. Behind the malformed line: a body
    # the stdlib read as the next request.
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + line +
                     b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        status, headers, body = read_response(sock)
        assert status == 400 and headers.get("connection") == "close", body
        assert closed_by_server(sock)
    assert_serving(server)


def test_header_lines_that_pass_are_read_as_the_stdlib_parser_reads_them() -> None:
    # The server reads its own header lines (httphead.read_header_lines); every line it
    # lets through must give the values http.client's email-based parser gives, but for
    # the blanks after a value, which are not part of it (RFC 9110 5.5).
    rng = random.Random(7)
    value_chars = "".join(map(chr, [9, *range(0x20, 0x7f), *range(0x80, 0x100)]))
    names = ["Host", "X-A", "x-a", "Content-Type", "Authorization", "A!#$%&'*+.^_`|~-9"]
    for _ in range(300):
        lines = []
        for _ in range(rng.randint(0, 12)):
            value = "".join(rng.choice(value_chars) for _ in range(rng.randint(0, 20)))
            lines.append(f"{rng.choice(names)}:{value}\r\n".encode("latin-1"))
        head = b"".join(lines) + b"\r\n"
        ours = read_header_lines(io.BytesIO(head))
        theirs = http.client.parse_headers(io.BytesIO(head))
        for name in names:
            values = [value.rstrip(" \t") for value in theirs.get_all(name) or ()]
            assert ours.get_all(name, []) == values, head
            assert ours.get(name) == (values[0] if values else None), head


def test_a_head_the_connection_ends_within_is_400_not_served(server: Server) -> None:
    # The stdlib served what had come as the whole head: a client that half-closes
    # mid-head (or a proxy that cut it) had a request it never finished answered.
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        sock.shutdown(socket.SHUT_WR)
        status, headers, body = read_response(sock)
    assert status == 400 and headers.get("connection") == "close"
    assert b"ended within its head" in body
    assert_serving(server)


def test_header_lines_are_bounded_in_number_as_the_stdlib_bounds_them(server: Server) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
    assert exchange(server, head + b"X: y\r\n" * 98 + b"\r\n")[0] == 200  # 99 lines in all
    status, headers, _ = exchange(server, head + b"X: y\r\n" * 99 + b"\r\n")
    assert status == 431 and headers.get("connection") == "close"
    assert_serving(server)


def test_http_1_1_needs_a_host_and_1_0_does_not(server: Server) -> None:
    status, headers, _ = exchange(server, b"GET /health HTTP/1.1\r\n\r\n")
    assert status == 400 and headers.get("connection") == "close"
    assert exchange(server, b"GET /health HTTP/1.0\r\n\r\n")[0] == 200


def test_an_absolute_target_is_its_path_on_its_host(server: Server) -> None:
    # What a client sends to a proxy; RFC 9112 3.2.2: a server takes it too, by its host.
    status, _, body = exchange(server, b"GET http://127.0.0.1/health HTTP/1.1\r\n"
                                       b"Host: evil.example\r\n\r\n")
    assert status == 200, body
    assert exchange(server, b"GET http://evil.example/health HTTP/1.1\r\n"
                            b"Host: 127.0.0.1\r\n\r\n")[0] == 403  # its host is checked
    assert exchange(server, b"GET HTTP://localhost HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    # The host ends at a query too (it was read as the name 'localhost?x=1': a 403).
    assert exchange(server, b"GET http://localhost?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_a_body_of_a_byte_a_chunk_is_bounded(server: Server) -> None:
    chunks = b"1\r\na\r\n" * 70_000
    with connect(server) as sock:
        try:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        except ConnectionError:
            pass  # the server may close before all is sent; its answer is still there
        status, headers, body = read_response(sock)
    assert status == 400 and b"chunks" in body and headers.get("connection") == "close"
    assert_serving(server)


def test_header_fields_are_bounded_in_all(server: Server) -> None:
    # Each line under the 64 KiB line limit, 97 of them: 6 MB held per connection before.
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 60_000) for i in range(97))
    with connect(server) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + lines + b"\r\n")
        except ConnectionError:
            pass  # the server may close before all is sent; its answer is still there
        status, headers, _ = read_response(sock)
    assert status == 431 and headers.get("connection") == "close"
    assert_serving(server)


@pytest.mark.parametrize("path, body, status", [
    ("/v1/embeddings", {"input": "a", "encoding_format": ""}, 400),
    ("/v2/embed", {"texts": ["a"], "embedding_types": ["float"], "images": 0}, 400),
    ("/v2/embed", {"texts": ["a"], "embedding_types": ["float"], "images": {}}, 400),
    ("/v2/embed", {"texts": ["a"], "embedding_types": ["float"], "images": ["x"]}, 422),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "relevant_spans": 0}, 400),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "relevant_spans": True}, 422),
    # An empty model name is no name served, as on the embedding routes (not the default).
    ("/v2/rerank", {"model": "", "query": "q", "documents": ["a"]}, 404),
    ("/v1/embeddings", {"model": "", "input": "a"}, 404),
    ("/embed", {"inputs": "a", "prompt_name": ""}, 422),  # a name no prompt has
    ("/api/embed", {"model": "HASH-V1-384:LATEST", "input": "a"}, 200),  # names: any case
])
def test_odd_values_that_were_taken_for_absent_are_refused(server: Server, path: str,
                                                           body: dict, status: int) -> None:
    got, _, reply = server.request("POST", path, body)
    assert got == status, reply


def test_a_too_long_request_line_is_a_clients_error_in_teis_words(server: Server) -> None:
    status, _, body = exchange(server, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert status == 414 and json.loads(body)["error_type"] == "Validation"  # not "Backend"
    assert_serving(server)


def test_keep_alive_past_a_floats_range_is_forever_not_a_500(server: Server) -> None:
    status, _, body = server.request("POST", "/api/embed", raw=(
        b'{"model": "hash-v1-384", "input": "hi", "keep_alive": %s}' % (b"9" * 400)))
    assert status == 200, body


def test_body_on_get_is_never_parsed_as_the_next_request(server: Server) -> None:
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                     % len(smuggled) + smuggled)
        time.sleep(0.5)
        received = b""
        while select.select([sock], [], [], 0.2)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        assert received.count(b"HTTP/1.1 ") == 1, "the GET's body was answered as a request"
        assert received.startswith(b"HTTP/1.1 200")
        # The connection is still good for a real next request.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock)[0] == 200


# -- slots before bodies ------------------------------------------------------------------------

def test_a_full_server_refuses_a_large_body_before_reading_it(fresh_server: list[Server]
                                                              ) -> None:
    srv = start_server("--max-concurrent-requests", "1", "--request-timeout", "20")
    fresh_server.append(srv)
    body = json.dumps({"inputs": "held " * 20_000}).encode()  # over 64 KiB
    with connect(srv) as holder, connect(srv) as flood:
        # The holder's body is still on its way: it holds the one place for a large body.
        holder.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                       b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)
        # A big body announced, none sent: answered 429 at once, not after buffering it
        # (before: the server waited for all of it, then timed out with 408).
        flood.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                      b"Content-Length: 8000000\r\n\r\n")
        status, headers, reply = read_response(flood)
        assert status == 429 and headers.get("connection") == "close"
        assert b"large request bodies" in reply
        # A small request is served beside it: the holder takes no slot until its body is in.
        assert srv.request("POST", "/embed", {"inputs": "small"})[0] == 200
        holder.sendall(body[5:])
        status, _, reply = read_response(holder)
        assert status == 200 and json.loads(reply) == [EMBEDDER.embed_one("held " * 20_000)]


def test_clients_stalling_their_bodies_hold_no_slot(fresh_server: list[Server]) -> None:
    # Before, each held one of --max-concurrent-requests until --request-timeout: a few
    # sockets that never finish a body answered every other request 429.
    srv = start_server("--max-concurrent-requests", "2", "--request-timeout", "20")
    fresh_server.append(srv)
    stallers = [connect(srv) for _ in range(2)]
    try:
        for sock, framing in zip(stallers, (b"Content-Length: 100\r\n\r\n{",
                                            b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")):
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON + framing)
        time.sleep(0.3)
        for _ in range(3):
            status, _, reply = srv.request("POST", "/embed", {"inputs": "served"})
            assert status == 200 and reply == [EMBEDDER.embed_one("served")]
    finally:
        for sock in stallers:
            sock.close()


def test_tokenize_takes_a_slot_and_has_an_input_limit(fresh_server: list[Server]) -> None:
    srv = start_server("--max-concurrent-requests", "1")
    fresh_server.append(srv)
    status, _, body = srv.request("POST", "/tokenize", {"inputs": "word " * 60_000})
    assert status == 413 and "/tokenize" in body["error"]
    status, _, body = srv.request("POST", "/tokenize", {"inputs": "two words"})
    assert status == 200 and [t["text"] for t in body[0]] == ["two", "words"]
    # While a long embedding request holds the one slot, /tokenize is refused, before its
    # body is sent: a client waiting for "100 Continue" gets the 429 instead.
    big = {"inputs": [("lorem ipsum dolor %d " % i) * 150 for i in range(1500)]}
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(srv.request("POST", "/embed", big)[0]))
    thread.start()
    body = b'{"inputs": "two words"}'
    statuses = set()
    while thread.is_alive() and 429 not in statuses:
        with connect(srv) as sock:
            sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                         b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            status, _, _ = read_response(sock)
            statuses.add(status)  # 429 only if it came first, instead of the 100
            if status == 100:  # a slot was free: the body, and its answer
                sock.sendall(body)
                read_response(sock)
    thread.join(60)
    assert done == [200] and 429 in statuses, "the long request never overlapped a tokenize"


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_labels_are_bounded_and_escaped(fresh_server: list[Server]) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    srv = start_server("--api-key", "sesame")
    fresh_server.append(srv)
    auth = {"Authorization": "Bearer sesame"}
    rng = random.Random(7)
    for _ in range(200):
        method = "".join(rng.choices(string.ascii_uppercase, k=12)).encode()
        exchange(srv, method + b" /info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    exchange(srv, b'X"}\\n /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n')
    srv.request("GET", "/info?secret=" + "s" * 50, headers={"Authorization": "Bearer wrong"})
    status, _, _ = srv.request("GET", "/no/such/route", headers=auth)
    assert status == 404
    import http.client

    # A request is counted just after its answer is written: a scrape that follows it at
    # once may come first, so look again until the 404 shows (a few tries at most).
    for _ in range(50):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
        conn.request("GET", "/metrics", headers=auth)
        text = conn.getresponse().read().decode()
        conn.close()
        if 'route="(unknown)"' in text:
            break
        time.sleep(0.05)
    families = list(parser.text_string_to_metric_families(text))  # the format holds
    methods = {s.labels.get("method") for f in families for s in f.samples
               if s.name == "embedserve_requests_total"}
    routes = {s.labels.get("route") for f in families for s in f.samples
              if s.name == "embedserve_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods and "(unauthenticated)" in routes and "(unknown)" in routes
    assert "secret" not in text and len(text) < 20_000


# -- deep nesting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings", "/api/embed", "/tokenize", "/"])
def test_deeply_nested_json_is_400_without_a_traceback(server: Server, path: str) -> None:
    nested = "[" * 5000 + "]" * 5000
    for body in (nested, '{"inputs": %s, "input": %s}' % (nested, nested)):
        status, _, reply = server.request("POST", path, raw=body.encode())
        assert status == 400, reply
    assert not any("Traceback" in line for line in server.log)
    assert_serving(server)


def test_json_python_reads_differently_is_400_in_our_words(server: Server) -> None:
    # A 5,000-digit integer is valid JSON past Python's digit limit; NaN is not JSON at all;
    # a key given twice has no one meaning.
    for body, says in ((b'{"input": [[%s]]}' % (b"9" * 5000), "more than 4300 digits"),
                       (b'{"input": "a", "dimensions": NaN}', "NaN is not valid JSON"),
                       # Read as "b" here, as "a" by a parser keeping the first (a proxy's).
                       (b'{"input": "a", "input": "b"}', "appears more than once")):
        status, _, reply = server.request("POST", "/v1/embeddings", raw=body)
        assert status == 400 and says in str(reply), reply
        assert "set_int_max_str_digits" not in str(reply)
    assert_serving(server)


# -- browsers: Host, Origin, content types -------------------------------------------------------

@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:8765", b"127.0.0.1.nip.io",
                                  b"localhost.evil.example", b"[::1", b"a:b:c",
                                  b"[localhost]", b"[127.0.0.1]", b"localhost:\xb9", b".",
                                  b"localhost..", b"evil.example."])
def test_foreign_host_names_are_refused(server: Server, host: bytes) -> None:
    # DNS rebinding: a name the attacker controls, pointed at 127.0.0.1.
    status, _, body = exchange(server, b"GET /info HTTP/1.1\r\nHost: " + host +
                               b"\r\nConnection: close\r\n\r\n")
    assert status == 403 and b"allowed-hosts" in body


@pytest.mark.parametrize("host", [b"localhost", b"localhost:8765", b"127.0.0.1:1", b"[::1]:80",
                                  b"10.1.2.3", b"api.localhost", b"localhost.",
                                  b"localhost.:8765"])
def test_own_names_and_addresses_are_served(server: Server, host: bytes) -> None:
    status, _, _ = exchange(server, b"GET /info HTTP/1.1\r\nHost: " + host +
                            b"\r\nConnection: close\r\n\r\n")
    assert status == 200


def test_allowed_hosts_adds_names(fresh_server: list[Server]) -> None:
    srv = start_server("--allowed-hosts", "embed.internal, *.corp.example")
    fresh_server.append(srv)
    for host, expected in ((b"embed.internal", 200), (b"a.corp.example:9", 200),
                           (b"corp.example", 403), (b"evil.example", 403)):
        status, _, _ = exchange(srv, b"GET /health HTTP/1.1\r\nHost: " + host +
                                b"\r\nConnection: close\r\n\r\n")
        assert status == expected, host


def test_cross_origin_pages_are_refused_by_default(server: Server) -> None:
    origin = {"Origin": "https://evil.example"}
    status, headers, body = server.request("POST", "/embed", {"inputs": "x"}, headers=origin)
    assert status == 403 and "cors-origins" in body["error"]
    assert "access-control-allow-origin" not in headers
    status, _, _ = server.request("GET", "/info", headers=origin)
    assert status == 403


@pytest.mark.parametrize("twice", [
    b"Origin: http://localhost\r\nOrigin: http://evil.example\r\n" + JSON,
    b"Content-Type: application/json\r\nContent-Type: text/plain\r\n",
])
def test_a_header_the_checks_read_once_may_come_once(server: Server, twice: bytes) -> None:
    # Which of the two was checked is for no one to guess (a proxy may read the other):
    # the foreign Origin behind an allowed one, or text/plain, was let through.
    body = b'{"inputs": "x"}'
    status, _, reply = exchange(server, b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + twice +
                                b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status == 400 and b"more than one" in reply, reply
    assert_serving(server)


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_posts_must_declare_json(server: Server, content_type: str | None) -> None:
    # What a page can send cross-site without a CORS preflight is never taken as JSON.
    headers = {"Content-Type": content_type} if content_type else {}
    body = b'{"inputs": "x"}'
    import http.client

    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.putrequest("POST", "/embed", skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        reply = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 415 and "application/json" in reply["error"]


def test_a_compressed_body_is_a_415_naming_the_coding(server: Server) -> None:
    # It was read as it came: "400 request body is not valid UTF-8".
    body = gzip.compress(b'{"inputs": "x"}')
    for coding in ("gzip", "identity, br"):
        status, headers, reply = server.request("POST", "/embed", raw=body, headers={
            "Content-Encoding": coding})
        assert status == 415 and coding in reply["error"], reply
        assert headers["accept-encoding"] == "identity"
    status, _, reply = server.request("POST", "/embed", {"inputs": "x"},
                                      headers={"Content-Encoding": "identity"})
    assert status == 200 and reply == [EMBEDDER.embed_one("x")]


def test_cors_origins_allows_a_page_with_preflight(fresh_server: list[Server]) -> None:
    srv = start_server("--cors-origins", "http://app.example:3000", "--api-key", "k")
    fresh_server.append(srv)
    origin = "http://app.example:3000"
    # The preflight carries no credentials: it must not need the API key.
    status, headers, _ = srv.request("OPTIONS", "/v1/embeddings", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204
    assert headers["access-control-allow-origin"] == origin
    assert "POST" in headers["access-control-allow-methods"]
    allowed = headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "content-length" not in headers
    status, headers, body = srv.request("POST", "/v1/embeddings", {"input": "x"}, headers={
        "Origin": origin, "Authorization": "Bearer k"})
    assert status == 200 and headers["access-control-allow-origin"] == origin
    assert headers["vary"] == "Origin"
    status, _, _ = srv.request("OPTIONS", "/v1/embeddings", headers={
        "Origin": "http://other.example", "Access-Control-Request-Method": "POST"})
    assert status == 403


# -- a busy hash worker is not a hung one --------------------------------------------------------

def test_queued_big_requests_do_not_get_the_worker_killed(fresh_server: list[Server]) -> None:
    rng = random.Random(3)
    words = ["".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(40_000)]
    texts = [" ".join(rng.choices(words, k=60)) for _ in range(1500)]
    began = time.perf_counter()
    HashEmbedder(384).embed(texts)
    one_call = time.perf_counter() - began
    # Each call alone is well within the timeout; five queued behind each other are not.
    timeout = max(1.0, 2.5 * one_call)
    srv = start_server("--worker-timeout", f"{timeout:.2f}")
    fresh_server.append(srv)
    pid = srv.request("GET", "/info")[2]["pid"]
    statuses: list[int] = []

    def send() -> None:
        statuses.append(request(srv.host, srv.port, "POST", "/embed", {"inputs": texts},
                                timeout=120)[0])

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    info = srv.request("GET", "/info")[2]
    assert statuses == [200] * 6
    assert info["pid"] == pid and info["restarts"] == 0


def test_requests_whose_clients_hung_up_are_not_hashed(fresh_server: list[Server]) -> None:
    # The hash tier embeds one request at a time. Requests queued behind a long one whose
    # clients had hung up were each computed in full, for no one; now they are dropped
    # (499) when their turn comes.
    srv = start_server()
    fresh_server.append(srv)
    words = " ".join(f"w{j}" for j in range(1000))  # ~5 KB a text
    live = threading.Thread(target=lambda: srv.request("POST", "/embed",
                                                       {"inputs": [words] * 300}))
    live.start()  # about 1.5 MB: several parts
    payload = json.dumps({"inputs": [words] * 200}).encode()
    for _ in range(3):
        with connect(srv) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\n" + JSON +
                         b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    live.join(120)
    samples = scrape_until(srv, lambda s: requests_of(s, "/embed", "POST", "499") == 3)
    assert requests_of(samples, "/embed", "POST", "499") == 3
    texts = samples["embedserve_texts_embedded_total"]
    assert list(texts.values()) == [300], texts  # the live request's only
    assert_serving(srv)


# -- echoes ---------------------------------------------------------------------------------------

def test_error_messages_do_not_echo_unbounded_input(server: Server) -> None:
    huge = "m" * 1_000_000
    for path, body in (("/v1/embeddings", {"input": "x", "model": huge}),
                       ("/embed", {"inputs": "x", "prompt_name": huge}),
                       ("/v1/embeddings", {"input": "x", "encoding_format": huge})):
        status, _, reply = server.request("POST", path, body)
        assert status in (400, 404, 422) and len(json.dumps(reply)) < 1000, path
    big = int("9" * 4000)  # as many digits as Python reads
    for path, body in (("/v1/embeddings", {"input": "x", "dimensions": big}),
                       ("/v1/embeddings", {"input": "x", "dimensions": -big}),
                       ("/v2/embed", {"texts": ["x"], "model": "hash", "input_type": "query",
                                      "embedding_types": ["float"], "output_dimension": big}),
                       ("/v2/rerank", {"query": "q", "documents": ["a"], "model": "hash",
                                       "top_n": -big}),
                       ("/v2/rerank", {"query": "q", "documents": ["a"], "model": "hash",
                                       "max_tokens_per_doc": -big}),
                       ("/api/embed", {"model": "hash", "input": "x", "dimensions": big}),
                       ("/api/embed", {"model": "hash", "input": "x", "keep_alive": big})):
        status, _, reply = server.request("POST", path, body)
        assert 400 <= status < 500 and len(json.dumps(reply)) < 1000, (path, status)
    status, _, reply = server.request("GET", "/" + "p" * 60_000)
    assert status == 404 and len(json.dumps(reply)) < 1000
    status, _, reply = exchange(server, b"GET /" + b"p" * 60_000 + b"\xa0x HTTP/1.1\r\n"
                                        b"Host: localhost\r\n\r\n")  # split at the U+00A0
    assert status == 400 and len(reply) < 1000


def test_long_host_names_are_not_kept_by_the_host_check() -> None:
    """The Host check caches whether a name is an IP address (it runs on every request);
    a client sending 256 distinct 64 KiB Host headers must not pin 16 MiB in that cache.
    Still refused as before: a long name is no address, and not an allowed one."""
    from embedserve.config import Config
    from embedserve.guards import Guards, _is_short_ip

    guards = Guards.from_config(Config())
    before = _is_short_ip.cache_info().currsize
    for i in range(20):
        assert not guards.host_allowed(f"{i}" + "a" * 65_000 + ".example")
    assert _is_short_ip.cache_info().currsize == before
    assert guards.host_allowed("127.0.0.1:8765") and guards.host_allowed("[::1]:8765")
