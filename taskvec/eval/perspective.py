"""A Perspective API client that scores one text per request at a bounded rate.

The key is sent in the `x-goog-api-key` header, never in the URL, so that no exception text,
proxy log or progress message carries it; any server message is redacted before it is shown.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from taskvec.errors import TaskvecError, brief

URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
KEY_VARIABLE = "PERSPECTIVE_API_KEY"
DEFAULT_CONFIG = Path("~/.config/taskvec/perspective.yaml")


def find_api_key(api_key: str | None = None, config: str | Path | None = None) -> str:
    """The key from the argument, else from the `config` file, else $PERSPECTIVE_API_KEY, else
    from ~/.config/taskvec/perspective.yaml (YAML with `api_key: KEY`, as the original's)."""
    if api_key:
        return api_key
    if config is not None:
        if not Path(config).is_file():
            raise TaskvecError(f"Perspective config file {config} does not exist")
        return _read_key(Path(config))
    if os.environ.get(KEY_VARIABLE):
        return os.environ[KEY_VARIABLE]
    if DEFAULT_CONFIG.expanduser().is_file():
        return _read_key(DEFAULT_CONFIG.expanduser())
    raise TaskvecError(f"no Perspective API key: set {KEY_VARIABLE}, or write `api_key: YOUR_KEY` to "
                       f"{DEFAULT_CONFIG} (or a file passed with --perspective-config)")


def _read_key(path: Path) -> str:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise TaskvecError(f"cannot read {path} ({type(err).__name__})") from err
    key = content.get("api_key") if isinstance(content, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise TaskvecError(f"{path}: no `api_key: YOUR_KEY` entry")
    return key.strip()


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
            try:
                response = self._session.post(self.url, json=body, timeout=self.timeout,
                                              headers={"x-goog-api-key": self._key})
            except requests.Timeout:
                failure = f"no answer within {self.timeout:g} s"
            except requests.ConnectionError as err:
                failure = f"cannot connect ({type(err).__name__})"
            else:
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
            return float(response.json()["attributeScores"][self.attribute]["summaryScore"]["value"])
        except (ValueError, KeyError, TypeError) as err:
            raise TaskvecError(f"Perspective API answered without a {self.attribute} score") from err

    def _reason(self, response) -> str:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.reason or "no reason given"
        return brief(str(message).replace(self._key, "***"))


def _retry_after(response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
