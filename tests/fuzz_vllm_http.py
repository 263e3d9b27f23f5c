"""Differential fuzzing: random bad (and odd) requests to a real vLLM and to the simulator and gateway.

    .venv/bin/python -m tests.fuzz_vllm_http [--cases 300] [--seed 0] [--out fuzz.json]

Starts one real engine as the interop tests do (``make vllm`` first, an AVX-512 CPU), one simulated
worker configured like it, and a gateway in front of the simulator; sends every generated request to all
three and reports where the simulator's or the gateway's answer differs from the engine's in what a client
relies on (``tests.conformance.digest``; for the gateway, the status, and an error where the engine gave
one). A difference found here becomes a case in ``tests/conformance_cases.py`` (recorded by
``python -m tests.record_vllm_http``), so the suite keeps it fixed. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvgate.dev.launch import free_port
from tests.conformance import digest
from tests.conformance_cases import MODEL, Case, chat, completion
from tests.helpers import TINY_MODEL, python_module, wait_http
from tests.record_vllm_http import send
from tests.test_conformance import ENGINE
from tests.vllm_engines import start_engines, unavailable_reason

_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    -7,
    2**31,
    2**63,
    10**30,
    0.5,
    1.5,
    -0.5,
    1e20,
    "",
    "a",
    "10",
    "0.5",
    "true",
    [],
    [1],
    [-1],
    ["a"],
    ["a", 1],
    [[1, 2]],
    {},
    {"a": 1},
    {"type": "text"},
]

_CHAT_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "stop_token_ids",
    "seed",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "ignore_eos",
    "min_tokens",
    "prompt_logprobs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template_kwargs",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "echo",
    "truncate_prompt_tokens",
    "priority",
    "request_id",
    "cache_salt",
    "documents",
    "mm_processor_kwargs",
    "structured_outputs",
    "reasoning_effort",
    "kv_transfer_params",
    "vllm_xargs",
    "return_tokens_as_token_ids",
    "allowed_token_ids",
    "bad_words",
    "length_penalty",
    "use_beam_search",
    "best_of",
    "service_tier",
    "metadata",
    "store",
    "modalities",
    "prediction",
    "audio",
    "functions",
    "function_call",
    "web_search_options",
]

_COMPLETION_FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "echo",
    "suffix",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "ignore_eos",
    "min_tokens",
    "prompt_logprobs",
    "add_special_tokens",
    "response_format",
    "truncate_prompt_tokens",
    "priority",
    "request_id",
    "cache_salt",
    "prompt_embeds",
    "return_tokens_as_token_ids",
    "allowed_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "kv_transfer_params",
    "vllm_xargs",
    "structured_outputs",
]

_CALL = {"name": "f", "arguments": "{}"}
_MESSAGES: list[Any] = [
    [],
    [{}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": ["hi"]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
    [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}],
    [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}],
    [{"role": "user", "content": [{"type": "nonsense"}]}],
    [{"role": "robot", "content": "hi"}],
    [{"role": 5, "content": "hi"}],
    [{"role": "system", "content": "be brief"}],
    [{"role": "assistant", "content": "hello"}],
    [{"role": "assistant", "content": None}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": _CALL}]}],
    [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {**_CALL, "arguments": "{"}}]}],
    [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
    [{"role": "tool", "content": "42"}],
    [{"role": "tool", "content": "42", "tool_call_id": "c"}],
    [{"role": "user", "content": "hi", "name": "bob"}],
    [{"role": "user", "content": "hi", "name": 5}],
    [{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"}],
    [{"role": "function", "content": "x", "name": "f"}],
    [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "\ud800"}],
    [{"role": "user", "content": "a\u0000b"}],
    [{"role": "user", "content": "{{ raise_exception('x') }}"}],
    [{"role": "user", "content": "<|begin_of_text|><|eot_id|>"}],
    [{"role": "user", "content": "hi", "extra": {"deep": [1, 2]}}],
    [{"role": "user", "content": "hi", "reasoning_content": "hmm"}],
    "hi",
    {"role": "user", "content": "hi"},
    [[{"role": "user", "content": "hi"}]],
    [None],
    ["hi"],
]

_PROMPTS: list[Any] = [
    "",
    [],
    [""],
    [[]],
    [1, 2, 3],
    [[1, 2], [3]],
    [-1],
    [10**9],
    [1.5],
    ["a", 1],
    [["a"]],
    ["a", "b"],
    [True],
    5,
    None,
    {"text": "x"},
    "\ud800",
    "a\u0000b",
    "<|begin_of_text|>",
]

_HI = b'{"model": "kvgate-tiny", "messages": [{"role": "user", "content": "hi"}]'
_RAW: list[tuple[bytes, str | None]] = [
    (b"", "application/json"),
    (b"{", "application/json"),
    (b"[]", "application/json"),
    (b"null", "application/json"),
    (b"5", "application/json"),
    (b'"s"', "application/json"),
    (b'{"model": "kvgate-tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "application/json"),
    (b'\xef\xbb\xbf{"model": "kvgate-tiny", "messages": [{"role": "user", "content": "hi"}]}', "application/json"),
    (_HI + b', "max_tokens": NaN}', "application/json"),
    (_HI + b', "presence_penalty": NaN}', "application/json"),
    (_HI + b', "top_p": NaN}', "application/json"),
    (_HI + b', "logit_bias": {"5": NaN}}', "application/json"),
    (_HI + b', "min_p": Infinity}', "application/json"),
    (_HI + b', "repetition_penalty": -Infinity}', "application/json"),
    (_HI + b', "seed": NaN}', "application/json"),
    (_HI + b', "max_tokens": Infinity}', "application/json"),
    (_HI + b', "temperature": NaN}', "application/json"),
    (b'{"model": "kvgate-tiny", "model": 5, "messages": [{"role": "user", "content": "hi"}]}', "application/json"),
    (_HI + b"} trailing", "application/json"),
    (_HI + b', "max_tokens": 1e400}', "application/json"),
    (_HI + b', "max_tokens": 4.0}', "application/json"),
    (_HI + b', "max_tokens": 4}', "text/plain"),
    (_HI + b', "max_tokens": 4}', None),
    (b'{"model": "kvgate-tiny", "prompt": "hi", "max_tokens": 4}', "application/x-www-form-urlencoded"),
    (b"[" * 5000 + b"]" * 5000, "application/json"),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, "application/json"),
]


def _value(rng: random.Random) -> Any:
    v = rng.choice(_VALUES)
    return json.loads(json.dumps(v))  # a fresh copy


def generate(rng: random.Random, index: int) -> Case:
    kind = rng.random()
    if kind < 0.12:
        raw, content_type = rng.choice(_RAW)
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        return Case(f"raw-{index}", path, raw=raw, content_type=content_type)
    is_chat = kind < 0.6
    body = chat() if is_chat else completion()
    fields = _CHAT_FIELDS if is_chat else _COMPLETION_FIELDS
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name = rng.choice(fields)
        r = rng.random()
        if name == "messages" and r < 0.8:
            body[name] = json.loads(json.dumps(rng.choice(_MESSAGES)))
        elif name == "prompt" and r < 0.8:
            body[name] = json.loads(json.dumps(rng.choice(_PROMPTS)))
        elif r < 0.1:
            body.pop(name, None)
        else:
            body[name] = _value(rng)
    if rng.random() < 0.3:
        body.setdefault("stream", True)
    # Keep what could run long short: a valid request answers within a few tokens.
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64 and rng.random() < 0.7:
        body["max_tokens"] = 8
    path = "/v1/chat/completions" if is_chat else "/v1/completions"
    return Case(f"{'chat' if is_chat else 'completion'}-{index}", path, body=body)


def _comparable(answer: dict[str, Any]) -> dict[str, Any]:
    d = digest(answer)
    d.pop("text", None)
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-differences.json"))
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"cannot fuzz: {reason}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    cases = [generate(rng, i) for i in range(args.cases)]
    call = functools.partial(send, timeout=120.0)
    differences: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as logs:
        log_dir = Path(logs)
        (engine,) = start_engines(["fuzzed"], log_dir)
        config = replace(ENGINE, port=free_port())
        sim = python_module("kvgate.worker.sim", *config.cli_args(), log_path=log_dir / "sim.log")
        gw_port = free_port()
        gateway = python_module(
            "kvgate.gateway",
            "--port",
            gw_port,
            "--model",
            TINY_MODEL,
            "--served-model-name",
            MODEL,
            f"--worker=id=w0,url=http://127.0.0.1:{config.port}",
            "--admin-on-public-port",
            log_path=log_dir / "gateway.log",
        )
        try:
            wait_http(f"http://127.0.0.1:{config.port}/health", 60, sim)
            wait_http(f"http://127.0.0.1:{gw_port}/health", 60, gateway)
            for n, case in enumerate(cases):
                real = call(engine.port, case)
                got_sim = call(config.port, case)
                got_gw = call(gw_port, case)
                sim_diff = _comparable(got_sim) != _comparable(real)
                real_error = "error" in (real.get("json") or {})
                gw_diff = got_gw["status"] != real["status"] or (
                    real_error and "error" not in (got_gw.get("json") or {})
                )
                if not real_error and not gw_diff and real["status"] == 200:
                    gw_diff = _comparable(got_gw) != _comparable(real)
                if sim_diff or gw_diff or got_gw["status"] >= 500 or got_sim["status"] >= 500:
                    differences.append(
                        {
                            "case": case.name,
                            "path": case.path,
                            "body": case.body if case.raw is None else case.raw.decode("utf-8", "replace")[:300],
                            "content_type": case.content_type,
                            "vllm": real,
                            "sim": got_sim if sim_diff else "same",
                            "gateway": got_gw if gw_diff else "same",
                        }
                    )
                    print(
                        f"[{n}] {case.name}: vllm {real['status']} sim {got_sim['status']} gateway {got_gw['status']}"
                        f"{' (sim differs)' if sim_diff else ''}{' (gateway differs)' if gw_diff else ''}",
                        flush=True,
                    )
            for name, proc in (("sim", sim), ("gateway", gateway)):
                if proc.process is not None and proc.process.poll() is not None:
                    print(f"{name} died", file=sys.stderr)
        finally:
            gateway.stop()
            sim.stop()
            engine.stop()
        for name in ("sim.log", "gateway.log"):
            text = (log_dir / name).read_text()
            if "Traceback" in text:
                print(f"--- {name} has a traceback:\n{text[text.index('Traceback') - 200 :][:3000]}", file=sys.stderr)
    args.out.write_text(json.dumps(differences, indent=1, ensure_ascii=False, default=str) + "\n")
    print(f"{len(differences)} of {len(cases)} cases differ -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
