"""What vLLM's OpenAI-compatible HTTP API takes and answers, where the gateway and the simulated worker must agree:
which bodies it reads as JSON, and what a model card holds.

vLLM 0.32 checks every generation request's ``Content-Type`` before it reads the body
(``validate_json_request``): the media type, lower-cased and without parameters such as ``charset``,
must be ``application/json``. A request with no ``Content-Type``, ``text/plain``, a form type (what
``curl -d`` sends without ``-H 'Content-Type: application/json'``) or ``application/merge-patch+json``
gets a 400 "Unsupported Media Type" (recorded from a real engine:
``tests/fixtures/vllm-0.32/http/conformance.json``).
"""

from __future__ import annotations

import hashlib
from typing import Any

UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"


def is_json_content_type(value: str | None) -> bool:
    """Whether vLLM reads a request with this ``Content-Type`` header (None: absent) as JSON."""
    return value is not None and value.split(";", 1)[0].lower() == "application/json"


_UTF8_BOM = b"\xef\xbb\xbf"


def without_bom(body: bytes) -> bytes:
    """``body`` without a leading UTF-8 byte order mark, which vLLM's parser (Python's ``json.loads`` on
    bytes) skips and orjson refuses."""
    return body[len(_UTF8_BOM) :] if body.startswith(_UTF8_BOM) else body


class TruncationRefused(ValueError):
    """A ``truncate_prompt_tokens`` vLLM 0.32 answers with a 400: ``message`` its words, ``param`` the
    parameter it names (None: none)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def truncated_ids(ids: list[int], keep: int, side: str | None, max_model_len: int) -> list[int]:
    """The prompt ids vLLM 0.32 keeps for ``truncate_prompt_tokens`` = ``keep`` (``TokenizeParams``): the
    last ``keep`` (the first with ``side`` 'right'; -1: the context window less one token, left for the
    answer). Raises ``TruncationRefused`` where vLLM refuses: ``keep`` over the window, or a truncation to
    nothing (an empty prompt)."""
    if keep > max_model_len:
        raise TruncationRefused(
            f"truncate_prompt_tokens={keep} cannot be greater than max_model_len = {max_model_len}. "
            "Please request a smaller truncation size.",
            "truncate_prompt_tokens",
        )
    if keep < 0:
        keep = max(0, max_model_len - 1)
    if keep >= len(ids):
        return ids
    if keep == 0:
        raise TruncationRefused("The decoder prompt cannot be empty")
    return ids[:keep] if side == "right" else ids[len(ids) - keep :]


def model_card(
    name: str, root: str, parent: str | None, max_model_len: int, created: int, owned_by: str = "vllm"
) -> dict[str, Any]:
    """One entry of ``/v1/models`` as vLLM 0.32 writes it, field for field (its permission list included;
    the permission id, random at vLLM, derived from the name here so every listing agrees)."""
    permission = {
        "id": f"modelperm-{hashlib.blake2b(name.encode(), digest_size=8).hexdigest()}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
