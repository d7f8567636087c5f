"""The Perspective key is never shown: a unique marker key, sent to a local server that echoes it
back in every way it can fail, never appears in an error, its repr, its chain, a log or the output."""

import json
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from taskvec.cli import main
from taskvec.errors import TaskvecError
from taskvec.eval import get_scorer
from taskvec.eval.perspective import PerspectiveScorer

MARKER = "tvkey-8d41c7f2e9b3"  # a valid key's characters; nothing else in the suite says this
HALVES = (MARKER[:9], MARKER[9:])


def http(status, body=b"", reason="Reason", headers=()):
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


def echo(status):
    """An answer with the key in the reason, the message, a header and a redirect target."""
    return lambda key: http(status, json.dumps({"error": {"message": f"API key not valid: {key}"}}).encode(),
                            reason=f"Nope {key}", headers=[("X-Echo", key), ("Location", f"/{key}"),
                                                           ("Retry-After", "0")])


def ok(value):
    return lambda key: http(200, json.dumps({"attributeScores": {"TOXICITY": {"summaryScore": {"value": value}}}})
                            .encode())


def slow(key):
    time.sleep(1.0)
    return http(200, b"{}")


FAILURES = {
    **{f"http-{status}": echo(status) for status in
       (204, 301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 409, 413, 418, 422, 429, 500, 501, 502, 503, 504, 599)},
    "not-json": lambda key: http(200, f"<html>{key}</html>".encode()),
    "echo-upper-case": lambda key: http(400, json.dumps({"error": {"message": f"bad key {key.upper()}"}}).encode()),
    "echo-truncated": lambda key: http(400, json.dumps({"error": {"message": f"bad key {key[:12]}..."}}).encode(),
                                       reason=f"key ...{key[-10:]}"),
    "no-score": lambda key: http(200, json.dumps({"echo": key}).encode()),
    "score-is-the-key": ok(MARKER),
    "score-out-of-range": ok(2.0),
    "score-bool": ok(True),
    "deeply-nested": lambda key: http(200, b"[" * 100_000 + key.encode() + b"]" * 100_000),
    "not-utf8": lambda key: http(200, b'{"e": "\xff' + key.encode() + b'"}'),
    "empty": lambda key: http(200),
    "truncated": lambda key: http(200, key.encode())[:-5],
    "bad-gzip": lambda key: http(200, key.encode(), headers=[("Content-Encoding", "gzip")]),
    "bad-chunks": lambda key: (f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{key}\r\n").encode(),
    "bad-status-line": lambda key: f"HTTP/1.1 abc {key}\r\n\r\n".encode(),
    "bad-header": lambda key: f"HTTP/1.1 500 x\r\n{key}\r\nContent-Length: 0\r\n\r\n".encode(),
    "silent-close": lambda key: b"",
    "timeout": slow,
}


class Stub:
    """Answers every POST with the raw bytes `reply(key)` returns, recording the keys it got."""

    def __init__(self):
        self.reply, self.keys = ok(0.5), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                stub.keys.append(self.headers.get("x-goog-api-key"))
                try:
                    self.wfile.write(stub.reply(stub.keys[-1]))
                except OSError:  # the client gave up
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1alpha1/comments:analyze"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def stub():
    server = Stub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/analyze"


def everything_said(err: BaseException) -> str:
    """str, repr and formatted traceback of the exception and of every exception it chains."""
    said, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        said += [str(err), repr(err), "".join(traceback.format_exception(err))]
        said += [repr(arg) for arg in err.args]
        err = err.__cause__ or err.__context__
    return "\n".join(said)


def assert_unsaid(*texts):
    """Neither the key nor half of it, in any letter case (a server may echo it changed)."""
    for text in texts:
        lowered = text.lower()
        assert MARKER not in lowered and not any(half in lowered for half in HALVES), text


OPTIONS = {"qps": 1000, "backoff": 0.001, "max_retries": 1, "timeout": 0.3}


@pytest.mark.parametrize("kind", FAILURES)
def test_no_failure_shows_the_key(stub, capsys, caplog, kind):
    stub.reply = FAILURES[kind]
    scorer = get_scorer("perspective", api_key=MARKER, url=stub.url, **OPTIONS)
    with pytest.raises(TaskvecError) as info:
        scorer.score(["some text"])
    assert stub.keys[0] == MARKER  # the server had the key to echo
    assert len(stub.keys) <= 2  # retried at most once; redirects not followed
    captured = capsys.readouterr()
    assert_unsaid(everything_said(info.value), captured.out, captured.err, caplog.text)


def test_connection_refused_does_not_show_the_key(capsys, caplog):
    scorer = get_scorer("perspective", api_key=MARKER, url=closed_port_url(), **OPTIONS)
    with pytest.raises(TaskvecError, match="cannot connect") as info:
        scorer.score(["some text"])
    captured = capsys.readouterr()
    assert_unsaid(everything_said(info.value), captured.out, captured.err, caplog.text)


@pytest.mark.parametrize("padded", [f" {MARKER}", f"{MARKER}\n", f"{MARKER}\r", f"{MARKER}\r\n", f"\t{MARKER} \n"])
def test_surrounding_white_space_is_stripped(stub, padded):
    assert get_scorer("perspective", api_key=padded, url=stub.url, **OPTIONS).score(["text"]) == [0.5]
    assert stub.keys == [MARKER]


BROKEN_KEYS = [HALVES[0] + sep + HALVES[1] for sep in (" ", "\r", "\n", "\r\n", "\t", "\x00", "\x7f", "é", "\u2019")]


@pytest.mark.parametrize("key", BROKEN_KEYS, ids=[repr(k[9:-9]) for k in BROKEN_KEYS])
def test_a_key_that_cannot_be_a_header_is_refused_unshown(stub, key):
    with pytest.raises(TaskvecError, match="white space, control or non-ASCII") as info:
        get_scorer("perspective", api_key=key, url=stub.url, **OPTIONS)
    assert_unsaid(everything_said(info.value))
    assert stub.keys == []


@pytest.mark.parametrize("content", [
    f"api_key: {MARKER}\n  oops: [\n".encode(),  # YAML errors quote the file
    f"api_key: [{MARKER}\n".encode(),
    f"api_key: '{HALVES[0]} {HALVES[1]}'\n".encode(),
    f"api_key: {MARKER}\xff\n".encode("latin-1"),
    f"api_key:\n  - {MARKER}\n".encode(),
])
def test_config_files_never_show_the_key(tmp_path, content):
    config = tmp_path / "perspective.yaml"
    config.write_bytes(content)
    with pytest.raises(TaskvecError) as info:
        get_scorer("perspective", config=config)
    assert_unsaid(everything_said(info.value))


@pytest.fixture
def cli_stub(stub, monkeypatch, tmp_path):
    """`taskvec score` talking to the stub, quickly, with $PERSPECTIVE_API_KEY set per test."""
    defaults = PerspectiveScorer.__init__.__kwdefaults__
    for name, value in {"url": stub.url, **OPTIONS}.items():
        monkeypatch.setitem(defaults, name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    generations = tmp_path / "gens.jsonl"
    generations.write_text(json.dumps({"prompt": "a", "continuation": "some text"}) + "\n")
    return stub, generations


@pytest.mark.parametrize("kind, key", [
    *[(kind, MARKER) for kind in ("http-400", "http-403", "http-500", "http-307", "not-json", "bad-header")],
    *[("http-200", key) for key in BROKEN_KEYS[:4]],
    ("http-401", f" {MARKER}\r\n"),
])
def test_the_score_command_never_prints_the_key(cli_stub, monkeypatch, kind, key):
    stub, generations = cli_stub
    stub.reply = FAILURES.get(kind, ok(0.5))
    monkeypatch.setenv("PERSPECTIVE_API_KEY", key)
    result = CliRunner().invoke(main, ["score", str(generations), "--scorer", "perspective"])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: "), result.output
    assert isinstance(result.exception, SystemExit)
    assert_unsaid(result.output, everything_said(result.exception))
    assert not (generations.parent / "gens-perspective").exists()


def test_retry_after_is_bounded():
    from taskvec.eval.perspective import MAX_RETRY_AFTER, _retry_after

    class Answer:
        def __init__(self, value):
            self.headers = {"Retry-After": value}

    assert [_retry_after(Answer(v)) for v in ("2", "-1", "inf", "nan", "1e400", "soon")] == [2.0, 0.0, None, None,
                                                                                               None, None]
    assert _retry_after(Answer("1e9")) == MAX_RETRY_AFTER
