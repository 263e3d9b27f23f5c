"""``python -m kvgate.worker.sim.bench``: throughput and CPU cost of one simulated worker.

Starts ``python -m kvgate.worker.sim`` on a free port, keeps ``--concurrency`` requests in
flight (distinct ``--prompt-tokens``-token text prompts, ``--output-tokens`` tokens
each with ignore_eos) until ``--requests`` are done, and prints requests/s and the
worker's CPU seconds per request (utime + stime from /proc). The baseline, measured in
the same run, is the same closed-loop workload driven through the pure scheduler with
no HTTP, no sleeping and no Python overhead counted: the requests/s the timing model
alone allows. Their ratio says how much of the simulated speed the process delivers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from kvgate.dev.launch import Service, free_port
from kvgate.worker.sim.config import EngineConfig, SimConfig
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import Scheduler

REPO = Path(__file__).resolve().parents[2]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _prompts(model_dir: Path, n: int, tokens: int, as_ids: bool, seed: int = 0) -> list[str] | list[list[int]]:
    """Prompts of exactly ``tokens`` tokens: random whole-word tokens of the model's vocabulary,
    as text (the worker tokenizes it) or as the token ids themselves."""
    from transformers import AutoTokenizer

    from kvgate.worker.sim.answer import Vocabulary

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = Vocabulary.from_tokenizer(tok)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.choice(vocab.first_words)] + [rng.choice(vocab.words) for _ in range(tokens - 1)]
        out.append(ids if as_ids else "".join(vocab.pieces[i] for i in ids))
    assert as_ids or len(tok.encode(out[0])) == tokens
    return out


def ideal_requests_per_second(
    engine: EngineConfig, n: int, concurrency: int, prompt_tokens: int, output_tokens: int
) -> float:
    """The timing model's own throughput for the closed-loop workload (simulated seconds only)."""
    s = Scheduler(engine)
    ids = iter(range(n))
    rng = random.Random(1)

    def add() -> None:
        i = next(ids, None)
        if i is not None:
            prompt = [rng.randrange(3, 8000) for _ in range(prompt_tokens)]
            s.add_request(Request(f"r{i}", prompt, output_tokens, iter(lambda: 100, None)))

    for _ in range(concurrency):
        add()
    seconds = 0.0
    while s.has_work:
        step = s.schedule()
        seconds += step.seconds
        for out in s.update(step):
            if out.finish_reason is not None:
                add()
    return n / seconds


async def _drive(base: str, prompts: list, concurrency: int, output_tokens: int, stream: bool) -> float:
    queue = list(reversed(prompts))
    payload = {"max_tokens": output_tokens, "ignore_eos": True, "stream": stream}

    async def worker(http: aiohttp.ClientSession) -> None:
        while queue:
            prompt = queue.pop()
            async with http.post(base + "/v1/completions", json={**payload, "prompt": prompt}) as r:
                body = await r.read()
                if r.status != 200 or (stream and not body.endswith(b"data: [DONE]\n\n")):
                    raise RuntimeError(f"bad answer {r.status}: {body[:200]!r}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m kvgate.worker.sim.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, default=REPO / "models" / "kvgate-tiny", help="model directory")
    p.add_argument("--speedup-ratio", type=float, default=100.0, help="the worker's --speedup-ratio")
    p.add_argument("--requests", type=int, default=1000, help="requests measured (after a warm-up of 64)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="tokens per prompt")
    p.add_argument("--output-tokens", type=int, default=32, help="generated tokens per request")
    p.add_argument("--stream", action="store_true", help="stream the answers (SSE) instead of one JSON body")
    p.add_argument(
        "--token-ids",
        action="store_true",
        help="send prompts as token ids (no tokenization in the worker) instead of text",
    )
    args = p.parse_args(argv)

    config = SimConfig(
        model_dir=args.model_dir, port=free_port(), engine=EngineConfig(speedup_ratio=args.speedup_ratio)
    )
    warmup = 64
    prompts = _prompts(args.model_dir, warmup + args.requests, args.prompt_tokens, args.token_ids)
    ideal = ideal_requests_per_second(
        config.engine, args.requests, args.concurrency, args.prompt_tokens, args.output_tokens
    )

    with tempfile.TemporaryDirectory(prefix="sim-bench-") as log_dir:
        worker = Service(
            "worker",
            [sys.executable, "-m", "kvgate.worker.sim", *config.cli_args(), "--log-level", "WARNING"],
            Path(log_dir),
            f"http://127.0.0.1:{config.port}/health",
            cwd=REPO,
        )
        worker.start()
        try:
            try:
                worker.wait_healthy(120)
            except (RuntimeError, TimeoutError) as err:
                raise SystemExit(f"worker did not start: {err}") from None
            assert worker.pid is not None
            base = f"http://127.0.0.1:{config.port}"
            asyncio.run(_drive(base, prompts[:warmup], args.concurrency, args.output_tokens, args.stream))
            cpu0 = _cpu_seconds(worker.pid)
            wall = asyncio.run(_drive(base, prompts[warmup:], args.concurrency, args.output_tokens, args.stream))
            cpu = _cpu_seconds(worker.pid) - cpu0
        finally:
            worker.stop(timeout=30)

    rps = args.requests / wall
    print(
        f"simulated worker: {args.requests} requests, {args.prompt_tokens}-token prompts, "
        f"{args.output_tokens} output tokens, {args.concurrency} in flight, speedup {args.speedup_ratio:g}, "
        f"{'streaming' if args.stream else 'non-streaming'}, prompts as {'token ids' if args.token_ids else 'text'}"
    )
    print(f"  measured   {rps:9.1f} req/s   ({wall:.2f} s wall)")
    print(f"  worker CPU {cpu / args.requests * 1000:9.2f} ms/request   ({cpu / wall * 100:.0f}% of one core)")
    print(f"  baseline   {ideal:9.1f} req/s   (timing model alone, same workload)")
    print(f"  ratio      {rps / ideal:9.3f}   measured / baseline")
    print(
        f"  load avg   {os.getloadavg()[0]:9.2f}   on {os.cpu_count()} CPUs (the worker shares them with this client)"
    )


if __name__ == "__main__":
    main()
