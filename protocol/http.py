"""What the OpenAI-compatible HTTP API reads as a JSON body, shared by the gateway and the simulated worker.

vLLM's server (FastAPI) parses a request body as JSON when the request has no ``Content-Type`` or one of
``application/json`` and ``application/<anything>+json`` (parameters such as ``charset`` ignored); any other
type leaves the body as bytes, which fail its request model's validation: a 400. ``curl -d`` without ``-H
'Content-Type: application/json'`` sends ``application/x-www-form-urlencoded`` and is refused that way.
"""

from __future__ import annotations


def is_json_content_type(value: str | None) -> bool:
    """Whether a request with this ``Content-Type`` header (None: absent) has its body read as JSON."""
    if value is None:
        return True
    media = value.split(";", 1)[0].strip().lower()
    if not media:
        return True
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))
