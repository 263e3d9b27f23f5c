"""Record a real vLLM's answers to the conformance cases (``tests/conformance_cases.py``).

    .venv/bin/python -m tests.record_vllm_http [--out tests/fixtures/vllm-0.32/http/conformance.json] [--missing]

Starts one real engine as the interop tests do (``tests/vllm_engines.py``: ``make vllm`` first, an
AVX-512 CPU), sends every case once, in order, and writes status, content type and body of each answer.
Run it again after a vLLM upgrade and read the diff: what changed is what the simulator must follow.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.conformance_cases import CASES, Case
from tests.vllm_engines import VLLM_MODEL, start_engines, unavailable_reason

OUT = Path(__file__).parent / "fixtures" / "vllm-0.32" / "http" / "conformance.json"


def send(port: int, case: Case, timeout: float = 120.0) -> dict[str, Any]:
    """One case over one fresh connection: status, content type, and the body as JSON or text."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = dict(case.headers)
        if case.content_type is not None:
            headers["Content-Type"] = case.content_type
        connection.request(case.method, case.path, body=case.data(), headers=headers)
        response = connection.getresponse()
        raw = response.read()
        answer: dict[str, Any] = {
            "status": response.status,
            "content_type": response.getheader("Content-Type"),
        }
    finally:
        connection.close()
    text = raw.decode("utf-8", "replace")
    try:
        answer["json"] = json.loads(text)
    except ValueError:
        answer["text"] = text
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--missing", action="store_true", help="send only the cases the recording lacks, and keep the others' answers"
    )
    args = parser.parse_args(argv)
    kept: dict[str, Any] = {}
    cases = CASES
    if args.missing and args.out.exists():
        kept = json.loads(args.out.read_text())["answers"]
        cases = [case for case in CASES if case.name not in kept]
    reason = unavailable_reason()
    if reason:
        print(f"cannot record: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as logs:
        (engine,) = start_engines(["recorded"], Path(logs))
        try:
            version = json.loads(engine.get("/version"))["version"]
            answers = {case.name: send(engine.port, case) for case in cases}
        finally:
            engine.stop()
    # The model's directory is this machine's: the recording names it as a placeholder.
    answers = json.loads(json.dumps(answers).replace(str(VLLM_MODEL), "<model-dir>"))
    answers = {case.name: {**kept, **answers}[case.name] for case in CASES}  # in the cases' order
    args.out.write_text(json.dumps({"vllm": version, "answers": answers}, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(answers)} answers of vLLM {version} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
