"""How an answer is compared with a real vLLM's (``tests/conformance_cases.py``): what a client can rely on.

``digest`` reduces one answer to the parts that must match: the status, the media type, and then
* an error: its JSON keys, ``type``, ``code`` and ``param``;
* a whole answer: its JSON shape (keys in order and the types of the values, recursively) and its fixed
  fields (``object``, each choice's ``index`` and ``finish_reason``, the message's ``role``);
* a stream: the shape of every frame and the same fixed fields (like frames in a row counted once), choice
  by choice, then the ``[DONE]`` line.
Generated text, ids, timestamps and token counts are the model's own and are left out.
"""

from __future__ import annotations

import json
from typing import Any

# The simulator's own extra, beside vLLM's cached_tokens (documented in worker/README.md).
SIM_EXTRAS = frozenset({"cached_tokens_per_tier"})


def shape(value: Any, key: str | None = None) -> Any:
    """Keys in order and the JSON types of the values, recursively; a list as the distinct shapes of its
    items (a token's ``bytes`` are as long as the token), a completion's ``top_logprobs`` maps, keyed by
    the tokens the model chose, as token to number, and ``prompt_logprobs`` entries, keyed by token id, as
    the shapes of their values."""
    if isinstance(value, dict):
        if key == "top_logprobs":
            return {"<token>": sorted({type(v).__name__ for v in value.values()})}
        if key == "prompt_logprobs":  # keyed by token id: the prompt's token and the top k (one or more)
            return {"<token id>": shape(list(value.values()))}
        return {k: shape(v, k) for k, v in value.items() if k not in SIM_EXTRAS}
    if isinstance(value, list):
        distinct: list[Any] = []
        for item in value:
            if (s := shape(item, key)) not in distinct:
                distinct.append(s)
        return distinct
    return type(value).__name__


def _fixed(answer: dict[str, Any]) -> dict[str, Any]:
    """The fields of a whole answer or a frame that do not depend on the model's output."""
    fixed: dict[str, Any] = {"object": answer.get("object")}
    choices = answer.get("choices")
    if isinstance(choices, list):
        fixed["choices"] = [
            {
                "index": c.get("index"),
                "finish_reason": c.get("finish_reason"),
                "role": (c.get("message") or c.get("delta") or {}).get("role"),
            }
            for c in choices
            if isinstance(c, dict)
        ]
    return fixed


def sse_events(text: str) -> list[Any]:
    """A stream's ``data:`` lines, each as JSON, ``[DONE]`` as the string it is."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def media_type(content_type: str | None) -> str | None:
    return content_type.split(";")[0].strip().lower() if content_type else None


def digest(answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` (status, content_type, and json or text) reduced to what must match."""
    out: dict[str, Any] = {"status": answer["status"], "media_type": media_type(answer["content_type"])}
    body = answer.get("json")
    if isinstance(body, dict) and "error" in body:
        error = body["error"]
        out["error"] = {"keys": sorted(error), **{k: error.get(k) for k in ("type", "code", "param")}}
    elif body is not None:
        out["shape"] = shape(body)
        out["fixed"] = _fixed(body) if isinstance(body, dict) else None
    elif out["media_type"] == "text/event-stream":
        # A stream of n > 1 choices interleaves them as the engine steps them: compared choice by choice.
        by_choice: dict[Any, list[Any]] = {}
        for event in sse_events(answer.get("text", "")):
            choices = event.get("choices") if isinstance(event, dict) else None
            index = choices[0].get("index") if choices and len(choices) == 1 else None
            frame = event if isinstance(event, str) else {"shape": shape(event), "fixed": _fixed(event)}
            frames = by_choice.setdefault(index, [])
            # A loaded engine merges the tokens of several steps into one frame: the count of like frames
            # in a row is its timing, not its protocol.
            if not frames or frames[-1] != frame:
                frames.append(frame)
        out["frames"] = sorted(by_choice.items(), key=lambda item: str(item[0]))
    else:
        out["text"] = answer.get("text")
    return out
