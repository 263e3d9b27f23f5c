"""``python -m kvgate.dev.cached_sim``: ``python -m kvgate.worker.sim`` (the same flags) with chat prompts
encoded through the gateway's prefix cache (gateway/incremental.py) instead of whole.

For benchmarks against Dynamo (`kvgate.loadtest.dynamo`), whose mocker receives token ids and never
tokenizes: there the workers share the host's two cores with the front end, and a simulated worker encoding
each 14k-token prompt whole (~17 ms of CPU) is a cost no real deployment puts on the gateway's host. The ids
are the same as a whole encode (the prefix cache is exact, proven at load and by property tests), so the
answers, events and cached-token counts are too. vLLM encodes whole, and so does ``kvgate.worker.sim``,
which the tests and the kv / round-robin benchmarks use: there the worker's encode is an independent check
of the gateway's ids, and a cache that hits more often under one routing mode would favour it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from kvgate.gateway.tokenization import Preprocessor, TokenizerError
from kvgate.worker.sim.__main__ import main as sim_main
from kvgate.worker.sim.prompt import PromptRenderer

log = logging.getLogger("kvgate.dev.cached_sim")

# Byte budget of the worker's prefix cache (text + ids of recent prompts).
CACHE_BYTES = 64 * 1024 * 1024


def load_preprocessor(model_dir: Path) -> Preprocessor:
    """The gateway's preprocessor for a worker: one thread, no split or head encodes (the worker calls the
    renderer from its one tokenize thread)."""
    pre = Preprocessor.load(
        str(model_dir),
        executor_threads=1,
        split_parts=1,
        head_chars=0,
        context_length=1 << 30,  # not used here; a directory without config.json must still load
        segment_cache_bytes=CACHE_BYTES,
    )
    pre.close()  # its thread pool is never used: encode_prompt runs on the caller's thread
    return pre


def renderer_over(pre: Preprocessor) -> PromptRenderer:
    # With the GIL released, as the simulator's own whole encodes (transformers' encode_batch): the worker's
    # event loop and engine steps run while a long prompt is encoded.
    return PromptRenderer(
        pre.tokenizer, lambda text: pre.encode_prompt(text, add_special_tokens=False, release_gil=True)
    )


def cached_renderer(model_dir: Path) -> PromptRenderer:
    """A renderer whose chat prompts go through the prefix cache; whole encodes when the gateway's
    preprocessor cannot load the tokenizer or its template (the worker then says why in its log)."""
    try:
        return renderer_over(load_preprocessor(model_dir))
    except TokenizerError as exc:
        log.warning("prompts are encoded whole: %s", exc)
        return PromptRenderer.from_dir(model_dir)


def main(argv: Sequence[str] | None = None) -> None:
    sim_main(list(argv) if argv is not None else None, renderer=cached_renderer)


if __name__ == "__main__":
    main()
