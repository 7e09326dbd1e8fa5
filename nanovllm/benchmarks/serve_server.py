"""What ``bench serve`` learns from the server before it sends a request, so that its requests fit the model.

- ``GET /v1/models``: the model to ask for, and its ``max_model_len`` (vLLM and nano-vLLM put it in each model
  card). A 401 here (a missing or wrong API key) ends the benchmark with one line, before any request is sent.
- ``GET /tokenizer_info`` (vLLM's): the vocabulary size and the special tokens, so that random token ids stay
  inside the vocabulary. A server without it answers 404, and the prompts come from elsewhere (see ``serve.py``).
- ``POST /tokenize``: token counts of texts (ShareGPT prompts, common-word prompts, the chat template's overhead),
  where no local tokenizer is given.

Plain ``urllib``: these few calls happen before the timed run.
"""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


class ServerError(Exception):
    """The server cannot be benchmarked as asked (unreachable, refuses the key, does not serve the model): one line
    for the user, not a traceback."""


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_model_len: int | None  # None: the model card does not say
    vocab_size: int | None  # None: no /tokenizer_info, or it does not say
    special_ids: frozenset[int]


def _call(url: str, api_key: str | None, timeout_s: float, body: Any = None) -> tuple[int, Any]:
    """(status, parsed JSON or text); ServerError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach the server at {url}: {reason}") from exc
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def error_message(body: Any) -> str:
    """The message of an OpenAI-shaped error body, else the body itself (shortened)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:300]


def _check_auth(url: str, status: int, body: Any) -> None:
    if status in (401, 403):
        raise ServerError(f"{url} answered HTTP {status} ({error_message(body)}): give the server's API key with "
                          "--api-key or $OPENAI_API_KEY")


def discover(root_url: str, api_key: str | None, model: str | None, timeout_s: float) -> ServerInfo:
    url = f"{root_url}/v1/models"
    status, body = _call(url, api_key, timeout_s)
    _check_auth(url, status, body)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ServerError(f"{url} answered HTTP {status}: {error_message(body)} (is it an OpenAI-compatible server?)")
    cards = [card for card in body["data"] if isinstance(card, dict) and "id" in card]
    if not cards:
        raise ServerError(f"{url} lists no model")
    if model is None:
        card = cards[0]
    else:
        card = next((c for c in cards if c["id"] == model), None)
        if card is None:
            raise ServerError(f"the server does not serve --model {model!r}; it serves "
                              f"{', '.join(repr(c['id']) for c in cards)}")
    max_model_len = card.get("max_model_len")
    vocab_size, special_ids = _tokenizer_info(root_url, api_key, timeout_s)
    return ServerInfo(card["id"], max_model_len if isinstance(max_model_len, int) else None, vocab_size,
                      special_ids)


def _tokenizer_info(root_url: str, api_key: str | None, timeout_s: float) -> tuple[int | None, frozenset[int]]:
    url = f"{root_url}/tokenizer_info"
    status, body = _call(url, api_key, timeout_s)
    _check_auth(url, status, body)
    if status != 200 or not isinstance(body, dict):
        if status not in (404, 405):
            logger.warning("%s answered HTTP %d (%s); going without it", url, status, error_message(body))
        return None, frozenset()
    vocab_size = body.get("vocab_size")
    special: set[int] = set()
    for key, token in (body.get("added_tokens_decoder") or {}).items():  # tokenizer_config.json's shape
        if str(key).isdigit() and (not isinstance(token, dict) or token.get("special", True)):
            special.add(int(key))
    special.update(i for i in body.get("all_special_ids") or [] if isinstance(i, int))
    return (vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else None), frozenset(special)


def server_token_counter(root_url: str, api_key: str | None, model: str, timeout_s: float
                         ) -> Callable[[list[str]], list[int | None]] | None:
    """Token counts of texts from the server's ``/tokenize`` (several at once), or None if it has none. A text the
    server refuses to count (longer than its ``max_model_len``: a 400) counts as None."""
    url = f"{root_url}/tokenize"
    status, body = _call(url, api_key, timeout_s, {"model": model, "prompt": "hello"})
    _check_auth(url, status, body)
    if status != 200 or not isinstance(body, dict) or "count" not in body:
        return None

    def count_one(text: str) -> int | None:
        status, body = _call(url, api_key, timeout_s, {"model": model, "prompt": text})
        if status == 400:
            logger.debug("%s does not count a text of %d characters: %s", url, len(text), error_message(body))
            return None
        if status != 200:
            raise ServerError(f"{url} answered HTTP {status}: {error_message(body)}")
        return int(body["count"])

    def count(texts: list[str]) -> list[int | None]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(count_one, texts))

    return count


def chat_template_tokens(root_url: str, api_key: str | None, model: str, timeout_s: float) -> int | None:
    """Tokens the chat template adds around one user message (what an empty message costs), or None."""
    status, body = _call(f"{root_url}/tokenize", api_key, timeout_s,
                         {"model": model, "messages": [{"role": "user", "content": ""}],
                          "add_generation_prompt": True})
    return int(body["count"]) if status == 200 and isinstance(body, dict) and "count" in body else None
