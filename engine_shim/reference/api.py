"""OpenAI-style ``POST /v1/completions`` for the reference engine.

Text in, text out through the toy tokenizer; ``usage.prompt_tokens_details.cached_tokens`` as
OpenAI reports it, and with ``"return_cached_tokens_details": true`` the split by tier
(device / host / storage), as SGLang's ``cached_tokens_details`` does.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

from ..server import HTTPError
from . import tokenizer
from .engine import ReferenceEngine, RequestRejected

REQUEST_TIMEOUT_SECONDS = 120.0


def _bad(message: str) -> HTTPError:
    return HTTPError(HTTPStatus.BAD_REQUEST, message)


def _prompt_tokens(body: dict[str, Any], vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, vocab_size)
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return list(prompt)
    raise _bad("prompt must be a string or a list of token ids")


def completions(engine: ReferenceEngine, body: dict[str, Any]) -> dict[str, Any]:
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _bad("max_tokens must be an integer")
    if max_tokens < 1:
        raise _bad(f"max_tokens must be at least 1, got {max_tokens}")
    details = body.get("return_cached_tokens_details", False)
    if not isinstance(details, bool):
        raise _bad("return_cached_tokens_details must be a boolean")
    prompt = _prompt_tokens(body, engine.config.shape.vocab_size)
    try:
        request = engine.submit(prompt, max_tokens)
    except RequestRejected as exc:
        raise _bad(str(exc)) from None
    if not request.done.wait(REQUEST_TIMEOUT_SECONDS):
        raise HTTPError(HTTPStatus.GATEWAY_TIMEOUT, f"{request.id} did not finish in time")
    cached = sum(request.cached_tokens.values())
    response: dict[str, Any] = {
        "id": f"cmpl-{request.id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.config.shape.name,
        "choices": [
            {
                "index": 0,
                "text": tokenizer.decode(request.output),
                "finish_reason": request.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(request.output),
            "total_tokens": len(prompt) + len(request.output),
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }
    if details:
        response["cached_tokens_details"] = dict(request.cached_tokens)
    return response
