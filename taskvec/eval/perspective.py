"""A Perspective API client that scores one text per request at a bounded rate.

The key is sent in the `x-goog-api-key` header, never in the URL, so that no exception text,
proxy log or progress message carries it; any server message is redacted before it is shown.
It is checked before the first request (requests would print a malformed header value in its
error), errors never chain another library's exception (whose text or request may hold it), and
redirects are not followed (they would carry the header to another host).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from taskvec.errors import TaskvecError, brief
from taskvec.jsonfile import parse_json

URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
KEY_VARIABLE = "PERSPECTIVE_API_KEY"
DEFAULT_CONFIG = Path("~/.config/taskvec/perspective.yaml")
MAX_RETRY_AFTER = 600.0  # seconds: a server's Retry-After beyond this is capped, not a hang
_KEY_CHARACTERS = re.compile(r"[!-~]+")  # printable ASCII without spaces: what an HTTP header may carry


def find_api_key(api_key: str | None = None, config: str | Path | None = None) -> str:
    """The key from the argument, else from the `config` file, else $PERSPECTIVE_API_KEY, else
    from ~/.config/taskvec/perspective.yaml (YAML with `api_key: KEY`, as the original's).
    Surrounding white space (a line end copied with the key) is stripped."""
    if api_key:
        return _checked(api_key, "the api_key argument")
    if config is not None:
        if not Path(config).is_file():
            raise TaskvecError(f"Perspective config file {config} does not exist")
        return _read_key(Path(config))
    if os.environ.get(KEY_VARIABLE, "").strip():
        return _checked(os.environ[KEY_VARIABLE], f"${KEY_VARIABLE}")
    if DEFAULT_CONFIG.expanduser().is_file():
        return _read_key(DEFAULT_CONFIG.expanduser())
    raise TaskvecError(f"no Perspective API key: set {KEY_VARIABLE}, or write `api_key: YOUR_KEY` to "
                       f"{DEFAULT_CONFIG} (or a file passed with --perspective-config)")


def _read_key(path: Path) -> str:
    import yaml

    content = failure = None
    try:
        content = yaml.safe_load(path.read_bytes())
    except (OSError, yaml.YAMLError) as err:  # YAML's message quotes the file: it may hold the key
        failure = type(err).__name__
    if failure:  # raised outside the handler, so that no exception chains the one above
        raise TaskvecError(f"cannot read {path} ({failure})")
    key = content.get("api_key") if isinstance(content, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise TaskvecError(f"{path}: no `api_key: YOUR_KEY` entry")
    return _checked(key, str(path))


def _checked(key: str, source: str) -> str:
    """The key without surrounding white space; one that cannot be sent in a header is refused
    without being shown."""
    key = key.strip()
    if not _KEY_CHARACTERS.fullmatch(key):
        raise TaskvecError(f"the Perspective API key in {source} holds white space, control or non-ASCII "
                           "characters, which an API key never has; check it")
    return key


class RateLimiter:
    """Spaces calls at least 1/qps seconds apart (start to start)."""

    def __init__(self, qps: float):
        if not qps > 0:
            raise TaskvecError(f"Perspective rate must be positive, got {qps} requests per second")
        self.interval = 1.0 / qps
        self._next = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self._next:
            time.sleep(self._next - now)
            now = time.monotonic()
        self._next = now + self.interval


class PerspectiveScorer:
    """Perspective's TOXICITY summary score, requested for English without storing the text.

    qps: requests per second (the API's default quota is 1). 429 and 5xx answers, timeouts and
    dropped connections are retried up to `max_retries` times, waiting backoff * 2**attempt
    seconds (or the server's Retry-After). 400/401/403 answers (a bad key, a refused text) stop
    the run with the server's reason. Empty texts score 0 without a request (the API refuses them).
    """

    name = "perspective"
    batch_size = 8

    def __init__(self, api_key: str | None = None, *, config: str | Path | None = None,
                 qps: float = 1.0, timeout: float = 30.0, max_retries: int = 5,
                 backoff: float = 1.0, url: str = URL, attribute: str = "TOXICITY"):
        import requests

        self._key = find_api_key(api_key, config)
        self._session = requests.Session()
        self._limiter = RateLimiter(qps)
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.url, self.attribute = url, attribute
        self.settings = {"attribute": attribute, "qps": qps}

    def score(self, texts):
        return [self._score_one(text) for text in texts]

    def _score_one(self, text: str) -> float:
        import requests

        if not text.strip():
            return 0.0
        body = {"comment": {"text": text}, "languages": ["en"], "doNotStore": True,
                "requestedAttributes": {self.attribute: {}}}
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            delay = self.backoff * 2**attempt
            response = None
            try:
                with _redacted_logs(self._key):
                    response = self._session.post(self.url, json=body, timeout=self.timeout, allow_redirects=False,
                                                  headers={"x-goog-api-key": self._key})
            except requests.Timeout:
                failure = f"no answer within {self.timeout:g} s"
            except requests.ConnectionError as err:
                failure = f"cannot connect ({type(err).__name__})"
            except requests.RequestException as err:  # a broken answer (bad chunking, encoding, ...)
                failure = f"unreadable answer ({type(err).__name__})"
            if response is not None:
                if response.status_code == 200:
                    return self._parse(response)
                failure = f"HTTP {response.status_code}: {self._reason(response)}"
                if response.status_code != 429 and response.status_code < 500:
                    key_problem = response.status_code in (401, 403) or "key" in failure.lower()
                    hint = "; check the API key" if key_problem else ""
                    raise TaskvecError(f"Perspective API refused the request ({failure}){hint}")
                delay = _retry_after(response) or delay
            if attempt < self.max_retries:
                time.sleep(delay)
        raise TaskvecError(f"Perspective API failed {self.max_retries + 1} times; last: {failure}")

    def _parse(self, response) -> float:
        try:
            answer = parse_json(response.content, "Perspective API answer", expect=dict)
            value = answer["attributeScores"][self.attribute]["summaryScore"]["value"]
        except (TaskvecError, KeyError, TypeError):
            value = None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise TaskvecError(f"Perspective API answered without a {self.attribute} score in [0, 1]")
        return float(value)

    def _reason(self, response) -> str:
        try:
            message = parse_json(response.content, "Perspective API answer", expect=dict)["error"]["message"]
        except (TaskvecError, KeyError, TypeError):
            message = response.reason or "no reason given"
        return brief(hide(str(message), self._key))


def hide(text: str, secret: str, shortest: int = 8) -> str:
    """`text` with the secret, in any letter case, and any start or end of it of `shortest`
    characters or more (a server may echo it truncated) replaced by ***."""
    for length in range(len(secret), min(shortest, len(secret)) - 1, -1):
        for part in {secret[:length], secret[-length:]}:
            text = re.sub(re.escape(part), "***", text, flags=re.IGNORECASE)
    return text


class _Redact(logging.Filter):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        error = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
        if hide(message + error, self.secret) != message + error:
            record.msg, record.args = hide(message, self.secret), ()
            record.exc_info = record.exc_text = None
        return True


@contextmanager
def _redacted_logs(secret: str):
    """urllib3 logs the headers of a malformed answer (a warning, with its traceback), where a
    server may echo the key: take it out of every urllib3 logger's records meanwhile."""
    redact = _Redact(secret)
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name.partition(".")[0] == "urllib3"]
    for logger in loggers:
        logger.addFilter(redact)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(redact)


def _retry_after(response) -> float | None:
    """The server's Retry-After in seconds, within [0, MAX_RETRY_AFTER]; None if it has none."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER) if math.isfinite(seconds) else None
