"""The simulator, and the gateway in front of it, answer every conformance case as a real vLLM 0.32 did.

The real engine's answers are recorded in ``tests/fixtures/vllm-0.32/http/conformance.json``
(``python -m tests.record_vllm_http``; the cases are ``tests/conformance_cases.py``). Both sides are
reduced by ``tests.conformance.digest`` to what a client relies on: status, media type, JSON shape of an
answer or of every stream frame, the fixed fields, an error's type, code and parameter. Where the
simulator validates a field itself it also answers vLLM's message, word for word.

The gateway refuses some requests before any worker sees them (it renders and tokenizes them to route):
those must carry the engine's status, in the gateway's own OpenAI error shape; everything it forwards
comes back as the engine answered.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kvgate.dev.launch import free_port
from kvgate.worker.sim.config import AnswerConfig, EngineConfig, SimConfig
from tests.conformance import digest, port_of
from tests.conformance_cases import CASES, MODEL, Case
from tests.helpers import TINY_MODEL, python_module, serving
from tests.record_vllm_http import send as record

send = functools.partial(record, timeout=60.0)

pytestmark = pytest.mark.slow

RECORDED = Path(__file__).parent / "fixtures" / "vllm-0.32" / "http" / "conformance.json"
ANSWERS: dict[str, dict[str, Any]] = json.loads(RECORDED.read_text())["answers"]
# The recorded engine: max_model_len 4,096, 65 blocks of 64 tokens, the tiny Llama over our tokenizer.
ENGINE = SimConfig(
    model_dir=TINY_MODEL,
    served_model_name=MODEL,
    port=0,
    engine=EngineConfig(block_size=64, num_gpu_blocks=65, max_num_seqs=8, max_model_len=4096, speedup_ratio=1000.0),
    answer=AnswerConfig(min_tokens=20, max_tokens=40),
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = replace(ENGINE, port=free_port())
    log = tmp_path_factory.mktemp("conformance") / "sim.log"
    proc = python_module("kvgate.worker.sim", *config.cli_args(), log_path=log)
    yield from serving(proc, f"http://127.0.0.1:{config.port}", log)


@pytest.fixture(scope="module")
def gateway(sim: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("conformance-gateway") / "gateway.log"
    # Its admin listener on the public port: the default, port + 1, may be the simulator's (a free port too).
    args = ("--port", port, "--model", TINY_MODEL, "--served-model-name", MODEL, f"--worker=id=w0,url={sim}")
    args = (*args, "--admin-on-public-port")
    yield from serving(python_module("kvgate.gateway", *args, log_path=log), f"http://127.0.0.1:{port}", log)


def test_the_recording_covers_every_case() -> None:
    assert sorted(ANSWERS) == sorted(c.name for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_simulator_answers_as_the_real_engine(sim: str, case: Case) -> None:
    real, got = ANSWERS[case.name], send(port_of(sim), case)
    assert digest(got) == digest(real), json.dumps({"sim": got, "vllm": real}, indent=1)[:4000]
    if case.counts:
        assert _exact(got) == _exact(real)
    if "error" in (real.get("json") or {}):
        message, expected = got["json"]["error"]["message"], real["json"]["error"]["message"]
        if case.union:  # the first of pydantic's errors, word for word
            assert message.splitlines()[1] == expected.splitlines()[1]
        else:
            assert message == expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_gateway_in_front_of_the_simulator_answers_with_the_engines_status(gateway: str, case: Case) -> None:
    """What the gateway forwards comes back as the engine answered it; what it refuses before routing
    (it renders, tokenizes and counts every prompt) it refuses with the engine's status, in its own
    OpenAI error shape."""
    real, got = ANSWERS[case.name], send(port_of(gateway), case)
    assert got["status"] == real["status"], json.dumps({"gateway": got, "vllm": real}, indent=1)[:4000]
    if not case.path.startswith("/v1/"):
        return  # the gateway's own /health: a JSON summary of its fleet where the engine answers nothing
    expected, digested = digest(real), digest(got)
    if "error" in expected or "error" in digested:
        assert "error" in digested or "detail" in (got.get("json") or {}), got
    else:
        assert digested == expected, json.dumps({"gateway": got, "vllm": real}, indent=1)[:4000]
    if case.counts:
        assert _exact(got) == _exact(real)


def _exact(answer: dict[str, Any]) -> object:
    """What must match exactly: a generation's prompt token count, or a (de)tokenization's answer."""
    body = answer["json"]
    if "usage" in body:
        return body["usage"]["prompt_tokens"]
    return {k: v for k, v in body.items() if k in ("count", "max_model_len", "tokens", "token_strs", "prompt")}
