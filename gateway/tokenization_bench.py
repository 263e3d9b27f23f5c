"""Tokenizer time per request, whole-string encode vs incremental (prefix cache), per real tokenizer.

    python -m kvgate.gateway.tokenization_bench [--quick] [names...]

Two workloads, the same in both modes (each mode on its own fresh Preprocessor, so the incremental one
has seen only what the workload showed it):
* chat: a multi-turn conversation whose prompt reaches ~2.4k tokens; the figure is the median of the
  `render_and_encode` tokenize time over turns 2.. (turn N extends turn N-1's prompt).
* document: an ~8k-token completions prompt, then 5 prompts extending it with a different question;
  the figure is the median over those 5.
Tokenizers come from models/fetched (`make tokenizers`). Figures are medians of wall time on this
machine; ratios are whole / incremental measured in the same run.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from typing import Any

from kvgate.gateway.tokenization import Preprocessor

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("llama3", "qwen2_5", "qwen3", "deepseek_v3", "mistral_nemo", "gemma3")

_PARAGRAPH = (
    "The gateway routes each request to the worker holding most of its prompt's KV cache. It tokenizes "
    "the prompt, hashes its blocks and asks the index which worker has them; 128 blocks of 16 tokens "
    "make a 2k-token prompt. Latency matters: every millisecond here is added to time-to-first-token.\n\n"
)


def _chat(pre: Preprocessor, turns: int) -> list[float]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful assistant. " + _PARAGRAPH * 3}]
    times = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn}: " + _PARAGRAPH * 2})
        times.append(pre.render_and_encode(messages).tokenize_seconds)
        messages.append({"role": "assistant", "content": f"Answer {turn}: " + _PARAGRAPH})
    return times[1:]


def _document(pre: Preprocessor, repeats: int) -> tuple[float, int]:
    document = _PARAGRAPH * 110
    tokens = len(pre.encode_prompt(document))
    times = []
    for question in range(repeats):
        started = time.perf_counter()
        pre.encode_prompt(document + f"Question {question}: what does the gateway hash?")
        times.append(time.perf_counter() - started)
    return statistics.median(times), tokens


def run(name: str, quick: bool) -> None:
    directory = REPO / "models" / "fetched" / name
    if not directory.is_dir():
        print(f"{name}: missing, run make tokenizers", file=sys.stderr)
        return
    turns, repeats = (6, 3) if quick else (12, 5)
    figures = {}
    for mode, prefix in (("whole", False), ("incremental", True)):
        budget = 1 << 27 if prefix else 0  # 0: no tokenizer cache at all, every prompt encoded whole
        with Preprocessor.load(str(directory), context_length=1 << 20, segment_cache_bytes=budget) as pre:
            chat = _chat(pre, turns)
            document, doc_tokens = _document(pre, repeats)
            figures[mode] = (statistics.median(chat), document, doc_tokens, pre.incremental_info().enabled)
    whole, inc = figures["whole"], figures["incremental"]
    print(
        f"{name:13s} chat turn N: whole {whole[0] * 1e3:6.2f} ms  incremental {inc[0] * 1e3:6.2f} ms "
        f"({whole[0] / inc[0]:5.1f}x) | {whole[2]}-token document + question: whole {whole[1] * 1e3:6.2f} ms  "
        f"incremental {inc[1] * 1e3:6.2f} ms ({whole[1] / inc[1]:5.1f}x)  [incremental on: {inc[3]}]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("names", nargs="*", default=list(NAMES))
    args = parser.parse_args(argv)
    for name in args.names:
        run(name, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
