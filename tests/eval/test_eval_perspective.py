"""The Perspective client against a stub HTTP server on 127.0.0.1 that replays scripted answers."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from taskvec.errors import TaskvecError
from taskvec.eval import get_scorer

KEY = "test-key-123"


class Stub:
    """Answers POSTs with scripted (status, body, headers, delay) replies, recording each request."""

    def __init__(self):
        self.script, self.requests = [], []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"time": time.monotonic(), "path": self.path, "body": body,
                                      "key": self.headers.get("x-goog-api-key")})
                status, reply, headers, delay = stub.script.pop(0) if stub.script else ok(0.5)
                time.sleep(delay)
                payload = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1alpha1/comments:analyze"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


def ok(value, delay=0.0):
    return 200, {"attributeScores": {"TOXICITY": {"summaryScore": {"value": value, "type": "PROBABILITY"}}}}, {}, delay


def error(status, message, headers=None):
    return status, {"error": {"code": status, "message": message}}, headers or {}, 0.0


@pytest.fixture
def stub():
    server = Stub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def scorer(stub, **options):
    return get_scorer("perspective", api_key=KEY, url=stub.url, **{"backoff": 0.01, **options})


def test_scores_and_request_format(stub):
    stub.script = [ok(0.25), ok(0.75)]
    assert scorer(stub, qps=100).score(["first", "", "second"]) == [0.25, 0.0, 0.75]
    assert len(stub.requests) == 2  # the empty text is not sent
    request = stub.requests[0]
    assert request["key"] == KEY and KEY not in request["path"]  # the key travels in a header only
    assert request["body"]["comment"] == {"text": "first"}
    assert request["body"]["requestedAttributes"] == {"TOXICITY": {}}
    assert request["body"]["doNotStore"] is True


def test_rate_limit_is_respected(stub):
    stub.script = [ok(0.1)] * 4
    scorer(stub, qps=4).score(["a", "b", "c", "d"])
    times = [r["time"] for r in stub.requests]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 0.25 s apart at the client; arrivals at a busy server jitter by some tens of milliseconds
    # (without the limiter the gaps would be about a millisecond)
    assert min(gaps) >= 0.25 - 0.08, gaps
    assert times[-1] - times[0] >= 3 * 0.25 - 0.08, gaps


def test_429_then_success(stub):
    stub.script = [error(429, "Quota exceeded"), error(503, "Unavailable"), ok(0.6)]
    assert scorer(stub, qps=100).score(["text"]) == [0.6]
    times = [r["time"] for r in stub.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.01 * 0.9 and times[2] - times[1] >= 0.02 * 0.9  # exponential backoff


def test_retry_after_header_is_honoured(stub):
    stub.script = [error(429, "slow down", {"Retry-After": "0.3"}), ok(0.2)]
    assert scorer(stub, qps=100).score(["text"]) == [0.2]
    assert stub.requests[1]["time"] - stub.requests[0]["time"] >= 0.3 * 0.9


def test_gives_up_after_retries(stub):
    stub.script = [error(500, "boom")] * 3
    with pytest.raises(TaskvecError, match=r"failed 3 times; last: HTTP 500: boom"):
        scorer(stub, qps=100, max_retries=2).score(["text"])


@pytest.mark.parametrize("status, message", [
    (400, f"API key not valid. Please pass a valid API key. ({KEY})"),
    (403, "The caller does not have permission"),
])
def test_bad_key_is_a_clear_error_without_the_key(stub, status, message):
    stub.script = [error(status, message)]
    with pytest.raises(TaskvecError, match=f"refused the request \\(HTTP {status}: .*\\); check the API key") as info:
        scorer(stub, qps=100).score(["text"])
    assert KEY not in str(info.value) and len(stub.requests) == 1  # not retried, key redacted


def test_timeout(stub):
    stub.script = [ok(0.1, delay=0.6), ok(0.1, delay=0.6)]
    with pytest.raises(TaskvecError, match=r"failed 2 times; last: no answer within 0.1 s"):
        scorer(stub, qps=100, timeout=0.1, max_retries=1).score(["text"])
    assert len(stub.requests) == 2


def test_key_from_environment_or_config(tmp_path, monkeypatch):
    from taskvec.eval.perspective import find_api_key

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/taskvec/perspective.yaml
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(TaskvecError, match="no Perspective API key: set PERSPECTIVE_API_KEY"):
        get_scorer("perspective")
    config = tmp_path / "perspective.yaml"
    config.write_text("api_key: from-file\n")
    assert find_api_key(config=config) == "from-file"
    default = tmp_path / ".config" / "taskvec" / "perspective.yaml"
    default.parent.mkdir(parents=True)
    default.write_text("api_key: from-default\n")
    assert find_api_key() == "from-default"
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "from-env")
    assert find_api_key() == "from-env"
    assert find_api_key(config=config) == "from-file"  # an explicit file wins over the environment
    assert find_api_key("from-argument", config=config) == "from-argument"
    with pytest.raises(TaskvecError, match="config file .*none.yaml does not exist"):
        find_api_key(config=tmp_path / "none.yaml")
    config.write_text("token: nope\n")
    with pytest.raises(TaskvecError, match="no `api_key: YOUR_KEY` entry"):
        find_api_key(config=config)
    with pytest.raises(TaskvecError, match="Perspective rate must be positive"):
        get_scorer("perspective", qps=0)
