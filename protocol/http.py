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
