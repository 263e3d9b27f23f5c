"""The simulated engine's pure core: block pool, prefix cache, scheduler, timing, answers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.protocol.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvgate.protocol.hashing import sequence_hashes
from kvgate.worker.sim.answer import TextStream, Vocabulary, answer_tokens
from kvgate.worker.sim.block_pool import BlockHasher
from kvgate.worker.sim.config import AnswerConfig, EngineConfig
from kvgate.worker.sim.request import Request
from kvgate.worker.sim.scheduler import Scheduler
from kvgate.worker.sim.timing import StepWork, TimingModel, decode_ms, prefill_ms

BS = 16


def engine(**kw) -> Scheduler:
    defaults = dict(
        block_size=BS, num_gpu_blocks=64, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512, seed=7
    )
    return Scheduler(EngineConfig(**{**defaults, **kw}))


def request(rid: str, prompt: list[int], max_tokens: int = 4, eos: int | None = None, sampler=None) -> Request:
    return Request(rid, prompt, max_tokens, sampler or iter(range(50_000, 10**9)), eos)


def run(s: Scheduler, max_steps: int = 10_000):
    """Step until idle; returns every step, its outputs and events."""
    steps = []
    for _ in range(max_steps):
        if not s.has_work:
            return steps
        step = s.schedule()
        outputs = s.update(step)
        steps.append((step, outputs, s.take_events()))
    raise AssertionError("engine did not go idle")


def stored(events) -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored)]


def stored_hashes(steps) -> list[int]:
    return [h for _, _, ev in steps for e in stored(ev) for h in e.block_hashes]


def removed_hashes(steps) -> list[int]:
    return [h for _, _, ev in steps for e in ev if isinstance(e, BlockRemoved) for h in e.block_hashes]


# --- block hashes ----------------------------------------------------------------------


def test_block_stored_carries_tokens_parent_and_block_size():
    s = engine()
    prompt = list(range(100, 100 + 3 * BS + 5))
    s.add_request(request("a", prompt, max_tokens=1))
    ev = stored(e for _, _, events in run(s) for e in events)
    assert len(ev) == 1
    (e,) = ev
    assert len(e.block_hashes) == 3 and e.parent_block_hash is None
    assert e.token_ids == prompt[: 3 * BS] and e.block_size == BS


def test_engine_hashes_are_seeded_and_differ_from_router_hashes():
    tokens = list(range(3 * BS))
    blocks = [tokens[i : i + BS] for i in range(0, len(tokens), BS)]

    def chain(hasher):
        out, parent = [], None
        for b in blocks:
            parent = hasher.hash_block(parent, b)
            out.append(parent)
        return out

    a, a2, b = chain(BlockHasher(1)), chain(BlockHasher(1)), chain(BlockHasher(2))
    assert a == a2 and a != b
    assert set(a).isdisjoint(sequence_hashes(tokens, BS))
    assert chain(BlockHasher()) != chain(BlockHasher())  # random per process/instance
    assert all(0 <= h < 2**64 for h in a)


def test_a_cache_salt_keys_the_first_block_and_so_the_whole_chain():
    tokens = list(range(3 * BS))
    hasher = BlockHasher(1)

    def chain(salt):
        out, parent = [], None
        for i in range(0, len(tokens), BS):
            parent = hasher.hash_block(parent, tokens[i : i + BS], salt if parent is None else None)
            out.append(parent)
        return out

    plain, a, b = chain(None), chain("tenant-A"), chain("tenant-B")
    assert chain("") == plain and chain("tenant-A") == a
    assert not set(a) & set(plain) and not set(a) & set(b)


def test_block_stored_names_extra_keys_per_block_as_vllm_does():
    s = engine()
    prompt = list(range(100, 100 + 3 * BS + 5))
    s.add_request(request("plain", prompt, max_tokens=1))
    salted = request("salted", prompt, max_tokens=BS)
    salted.cache_salt = "tenant-A"
    s.add_request(salted)
    plain_ev, first, *rest = stored(e for _, _, events in run(s) for e in events)
    assert plain_ev.extra_keys == [None, None, None]
    assert first.extra_keys == [("tenant-A",), None, None] and first.parent_block_hash is None
    assert first.token_ids == plain_ev.token_ids and not set(first.block_hashes) & set(plain_ev.block_hashes)
    # The block its answer fills continues the salted chain with no salt of its own.
    (more,) = rest
    assert more.parent_block_hash == first.block_hashes[-1] and more.extra_keys == [None]


def test_salted_requests_hit_only_their_own_salts_blocks():
    s = engine()
    prompt = list(range(2000, 2000 + 4 * BS + 3))
    hits = {}
    for rid, salt in (("a1", "tenant-A"), ("plain", None), ("b", "tenant-B"), ("a2", "tenant-A")):
        r = request(rid, prompt, max_tokens=1)
        r.cache_salt = salt
        s.add_request(r)
        run(s)
        hits[rid] = r.num_cached_tokens
    assert hits == {"a1": 0, "plain": 0, "b": 0, "a2": 4 * BS}


# --- prefix caching ----------------------------------------------------------------------


def test_second_request_hits_prefix_and_stores_only_new_blocks():
    s = engine()
    shared = list(range(1000, 1000 + 4 * BS))
    s.add_request(request("a", shared + [1, 2, 3], max_tokens=1))
    first = run(s)
    a_hashes = stored_hashes(first)
    assert len(a_hashes) == 4

    b = request("b", shared + list(range(5000, 5000 + 2 * BS)), max_tokens=1)
    s.add_request(b)
    second = run(s)
    assert b.num_cached_tokens == 4 * BS
    b_stored = stored(e for _, _, ev in second for e in ev)
    assert [h for e in b_stored for h in e.block_hashes if h in a_hashes] == []
    assert b_stored[0].parent_block_hash == a_hashes[-1]
    assert b_stored[0].token_ids == b.prompt_token_ids[4 * BS : 6 * BS]
    assert (s.kv.queries, s.kv.hits) == (len(shared) + 3 + len(b.prompt_token_ids), 4 * BS)
    # Cached blocks cost no prefill: b computed only its new tokens.
    assert sum(step.work.prefill_tokens for step, _, _ in second) == 2 * BS


def test_fully_cached_prompt_still_computes_its_last_token():
    s = engine()
    prompt = list(range(2 * BS))
    s.add_request(request("a", prompt, max_tokens=1))
    run(s)
    b = request("b", list(prompt), max_tokens=1)
    s.add_request(b)
    steps = run(s)
    assert b.num_cached_tokens == BS  # the second block holds the last token: recomputed
    assert steps[0][0].work.prefill_tokens == BS
    # vLLM counts the recomputed block as created, and stores its copy again.
    assert b.num_created_cache_tokens == BS
    assert [e.token_ids for e in stored(e for _, _, events in steps for e in events)] == [prompt[BS:]]


def test_created_cache_tokens_count_the_full_prompt_blocks_the_prefill_computed():
    s = engine()
    a = request("a", list(range(3 * BS + 5)), max_tokens=2 * BS)
    s.add_request(a)
    run(s)
    # Generated tokens filled a fourth block: only prompt blocks count.
    assert (a.num_cached_tokens, a.num_created_cache_tokens) == (0, 3 * BS)
    b = request("b", a.prompt_token_ids[: 2 * BS] + list(range(7000, 7000 + 2 * BS + 1)), max_tokens=1)
    s.add_request(b)
    run(s)
    assert (b.num_cached_tokens, b.num_created_cache_tokens) == (2 * BS, 2 * BS)
    c = request("c", list(range(9000, 9000 + BS - 1)), max_tokens=1)
    s.add_request(c)
    run(s)
    assert (c.num_cached_tokens, c.num_created_cache_tokens) == (0, 0)


def test_generated_tokens_fill_and_cache_blocks_too():
    s = engine()
    prompt = list(range(BS + 4))
    s.add_request(request("a", prompt, max_tokens=2 * BS))
    steps = run(s)
    e_all = stored(e for _, _, ev in steps for e in ev)
    # prompt block, then blocks completed by generated tokens (the last token never gets KV)
    assert sum(len(e.block_hashes) for e in e_all) == (BS + 4 + 2 * BS - 1) // BS
    assert e_all[1].token_ids[:4] == prompt[BS:] and e_all[1].parent_block_hash == e_all[0].block_hashes[-1]


def test_lru_eviction_emits_block_removed_oldest_first_and_tail_first():
    s = engine(num_gpu_blocks=8, max_model_len=128)
    s.add_request(request("a", list(range(0, 3 * BS + 1)), max_tokens=1))
    a_hashes = stored_hashes(run(s))
    s.add_request(request("b", list(range(10_000, 10_000 + 3 * BS + 1)), max_tokens=1))
    b_steps = run(s)
    b_hashes = stored_hashes(b_steps)
    assert removed_hashes(b_steps) == []  # 8 blocks: a's 4 + b's 4 fit
    # c needs 4 blocks: the 4 least recently freed go. a's were freed first, each request
    # frees tail first, so a's partial block, then a's last full block, and so on.
    s.add_request(request("c", list(range(20_000, 20_000 + 3 * BS + 1)), max_tokens=1))
    c_steps = run(s)
    assert removed_hashes(c_steps) == a_hashes[::-1]
    # b's prefix still cached; a's is gone.
    b2 = request("b2", list(range(10_000, 10_000 + 3 * BS + 1)), max_tokens=1)
    a2 = request("a2", list(range(0, 3 * BS + 1)), max_tokens=1)
    s.add_request(b2)
    s.add_request(a2)
    run(s)
    assert b2.num_cached_tokens == 3 * BS and a2.num_cached_tokens == 0
    assert set(b_hashes).isdisjoint(removed_hashes(c_steps))


def test_reused_block_is_protected_from_eviction_while_referenced():
    s = engine(num_gpu_blocks=6, max_model_len=96, max_num_seqs=1)
    shared = list(range(2 * BS))
    long_runner = request("a", shared + [7], max_tokens=20)
    s.add_request(long_runner)
    s.schedule()  # a holds its blocks while running
    s.add_request(request("b", list(range(900, 900 + 2 * BS + 1)), max_tokens=1))
    steps = run(s)
    assert not any(
        isinstance(e, BlockRemoved) and set(e.block_hashes) & set(long_runner.block_hashes[:2])
        for _, _, ev in steps
        for e in ev
    )


# --- scheduler limits ------------------------------------------------------------------


def test_max_num_seqs_bounds_running_requests():
    s = engine(max_num_seqs=3)
    for i in range(7):
        s.add_request(request(f"r{i}", [i + 1] * 20, max_tokens=5))
    peak = 0
    while s.has_work:
        step = s.schedule()
        peak = max(peak, len(s.running))
        assert len(s.running) <= 3 and len(step.num_scheduled_tokens) <= 3
        s.update(step)
    assert peak == 3


def test_max_num_batched_tokens_bounds_every_step_with_chunked_prefill():
    s = engine(max_num_batched_tokens=40, max_model_len=256)
    long = request("long", list(range(1, 101)), max_tokens=3)
    s.add_request(long)
    s.add_request(request("short", list(range(200, 210)), max_tokens=3))
    first_token_step = None
    for n, (step, outputs, _) in enumerate(run(s)):
        assert step.total_tokens <= 40
        if first_token_step is None and any(o.request_id == "long" for o in outputs):
            first_token_step = n
    assert first_token_step == 2  # 100 prompt tokens in chunks of 40, 40, 20
    assert len(long.output_token_ids) == 3


def test_decode_goes_first_and_prefill_takes_the_rest_of_the_budget():
    s = engine(max_num_batched_tokens=32, max_model_len=256)
    s.add_request(request("a", [5] * 8, max_tokens=10))
    s.update(s.schedule())  # a's prefill; it is decoding now
    s.add_request(request("b", list(range(300, 400)), max_tokens=1))
    step = s.schedule()
    assert step.num_scheduled_tokens == {"a": 1, "b": 31}
    assert (step.work.decode_requests, step.work.prefill_tokens) == (1, 31)


def test_preemption_when_the_pool_runs_out_and_everyone_still_finishes():
    s = engine(num_gpu_blocks=8, max_model_len=128, max_num_seqs=4)
    reqs = [request(f"r{i}", list(range(i * 1000, i * 1000 + BS)), max_tokens=3 * BS) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    run(s)
    assert s.num_preemptions > 0
    assert all(len(r.output_token_ids) == 3 * BS and r.finish_reason == "length" for r in reqs)
    assert s.pool.num_free_blocks == 8 and s.pool.usage == 0.0


def test_eos_stops_unless_ignored():
    s = engine()
    stopper = request("a", [1, 2, 3], max_tokens=50, eos=99, sampler=iter([5, 6, 99, 7, 8]))
    s.add_request(stopper)
    run(s)
    assert stopper.output_token_ids == [5, 6, 99] and stopper.finish_reason == "stop"
    ignorer = request("b", [1, 2, 3], max_tokens=4, eos=None, sampler=iter([5, 99, 6, 7, 8]))
    s.add_request(ignorer)
    run(s)
    assert ignorer.output_token_ids == [5, 99, 6, 7] and ignorer.finish_reason == "length"


def test_max_model_len_ends_generation():
    s = engine(max_model_len=40)
    r = request("a", list(range(30)), max_tokens=100)
    s.add_request(r)
    run(s)
    assert r.num_tokens == 40 and r.finish_reason == "length"


def test_abort_frees_blocks_immediately_and_skips_pending_output():
    s = engine()
    r = request("a", list(range(3 * BS)), max_tokens=100)
    s.add_request(r)
    s.update(s.schedule())
    step = s.schedule()
    assert s.pool.usage > 0
    assert s.abort("a")
    assert s.pool.usage == 0.0 and not s.has_work
    assert s.update(step) == []
    assert not s.abort("a")


def test_bad_requests_are_refused_by_the_engine():
    s = engine(max_model_len=32)
    with pytest.raises(ValueError):
        s.add_request(request("a", []))
    with pytest.raises(ValueError):
        s.add_request(request("a", list(range(32))))
    s.add_request(request("a", [1]))
    with pytest.raises(ValueError):
        s.add_request(request("a", [2]))


def test_config_refuses_a_context_larger_than_the_cache():
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(block_size=16, num_gpu_blocks=4, max_model_len=65).validate()
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0).validate()


# --- reset -------------------------------------------------------------------------------


def test_reset_prefix_cache_refused_while_running_then_forced():
    s = engine()
    prompt = list(range(2 * BS + 1))
    s.add_request(request("a", prompt, max_tokens=1))
    run(s)
    s.add_request(request("b", list(range(500, 600)), max_tokens=10))
    s.update(s.schedule())
    s.take_events()
    assert not s.reset_prefix_cache()
    assert s.take_events() == []
    assert s.reset_prefix_cache(preempt_running=True)
    assert [type(e) for e in s.take_events()] == [AllBlocksCleared]
    again = request("a2", prompt, max_tokens=1)
    s.add_request(again)
    run(s)
    assert again.num_cached_tokens == 0
    assert s.requests == {} and s.pool.num_free_blocks == s.pool.num_blocks


# --- invariants under random workloads -----------------------------------------------------


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 60), st.integers(1, 20), st.booleans()), min_size=1, max_size=25
    ),
    st.integers(4, 12),
    st.integers(1, 4),
    st.integers(8, 64),
)
def test_random_workloads_keep_the_pool_consistent(ops, blocks, max_seqs, budget):
    s = Scheduler(
        EngineConfig(
            block_size=8,
            num_gpu_blocks=blocks,
            max_num_seqs=max_seqs,
            max_num_batched_tokens=budget,
            max_model_len=blocks * 8,
            seed=3,
        )
    )
    counter = itertools.count()
    live_hashes: set[int] = set()

    def check(step=None):
        held: dict[int, int] = {}
        for r in s.running:
            for b in s.kv._blocks.get(r.request_id, []):
                held[b.block_id] = held.get(b.block_id, 0) + 1
        for b in s.pool.blocks:
            assert b.ref_cnt == held.get(b.block_id, 0)
        assert s.pool.num_free_blocks == sum(1 for b in s.pool.blocks if b.ref_cnt == 0)
        assert len(s.running) <= max_seqs
        if step is not None:
            assert step.total_tokens <= budget

    for prefix, length, max_tokens, abort in ops:
        rid = f"r{next(counter)}"
        prompt = [prefix + 1] * min(length, blocks * 8 - 1)
        s.add_request(request(rid, prompt, max_tokens=max_tokens))
        for _ in range(3):
            if s.has_work:
                step = s.schedule()
                check(step)
                s.update(step)
                check()
        if abort:
            s.abort(rid)
            check()
        for e in s.take_events():
            if isinstance(e, BlockStored):
                live_hashes.update(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                assert set(e.block_hashes) <= live_hashes  # never removes what it never stored
    run(s)
    check()
    assert s.pool.num_free_blocks == blocks


# --- timing ----------------------------------------------------------------------------------


def test_timing_model_matches_the_mocker_polynomials():
    assert prefill_ms(0) == 0.0
    assert prefill_ms(1000) == pytest.approx(4.209989e-7 * 1e6 + 15.18344 + 16.50142)
    assert decode_ms(0.0) == pytest.approx(5.74)
    assert decode_ms(0.5) == pytest.approx(-25.74 / 4 + 54.01 / 2 + 5.74)
    assert decode_ms(5.0) == decode_ms(1.0)  # utilisation is clamped to [0, 1]
    t = TimingModel(speedup_ratio=100)
    assert t.step_seconds(StepWork(1000, 3, 0.5)) == pytest.approx((prefill_ms(1000) + decode_ms(0.5)) / 1e5)
    assert t.step_seconds(StepWork(0, 0, 0.9)) == 0.0


def test_cached_prompt_shortens_time_to_first_token():
    s = engine(speedup_ratio=1.0)
    prompt = list(range(1, 8 * BS + 2))
    s.add_request(request("a", prompt, max_tokens=1))
    cold = run(s)[0][0].seconds
    s.add_request(request("b", list(prompt), max_tokens=1))
    warm = run(s)[0][0].seconds
    assert warm < cold
    assert warm == pytest.approx(prefill_ms(1) / 1000)


# --- answers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab():
    from transformers import AutoTokenizer

    from tests.helpers import TINY_MODEL

    return Vocabulary.from_tokenizer(AutoTokenizer.from_pretrained(str(TINY_MODEL)))


def test_answers_are_deterministic_per_prompt_and_end_with_eos(vocab):
    cfg = AnswerConfig(min_tokens=5, max_tokens=9)
    a = list(answer_tokens([1, 2, 3], vocab, cfg))
    assert a == list(answer_tokens([1, 2, 3], vocab, cfg))
    assert a != list(answer_tokens([1, 2, 4], vocab, cfg))
    assert a[-1] == vocab.eos_token_id and 5 <= len(a) - 1 <= 9
    endless = answer_tokens([1, 2, 3], vocab, cfg, ignore_eos=True)
    assert vocab.eos_token_id not in list(itertools.islice(endless, 200))


def test_text_stream_cuts_at_the_first_stop_string_even_across_tokens():
    pieces = {1: "hel", 2: "lo wo", 3: "rld", 4: " again"}
    t = TextStream(pieces, stop=["o wor", "again"])
    assert not t.add([1])
    out = t.delta()
    assert t.add([2, 3])
    assert t.stop_reason == "o wor"
    out += t.delta()
    assert out == "hell" and t.text == "hell"


def test_text_stream_holds_back_only_a_possible_stop_prefix():
    t = TextStream({1: "abcdef", 2: "gh"}, stop=["xyz"])
    t.add([1])
    assert t.delta() == "abcd"  # "ef" might start "xyz"... held back
    t.add([2])
    assert t.delta(final=True) == "efgh"
    plain = TextStream({1: "abc"})
    plain.add([1])
    assert plain.delta() == "abc"


# --- the asyncio engine loop, in process -----------------------------------------------------


async def test_engine_loop_streams_cuts_at_stop_strings_and_ends_pending_requests_on_stop(vocab):
    from kvgate.worker.sim.engine_loop import EngineLoop

    loop = EngineLoop(engine(speedup_ratio=1000.0), vocab, AnswerConfig(min_tokens=30, max_tokens=40))
    loop.start()
    try:
        full = loop.submit("full", [5, 6, 7], max_tokens=12)
        text = "".join([d.text async for d in full.deltas()])
        assert full.finish_reason == "length" and full.completion_tokens == 12
        stop = text.split()[2]
        cut = loop.submit("cut", [5, 6, 7], max_tokens=12, stop=[stop])
        cut_text = "".join([d.text async for d in cut.deltas()])
        assert cut.finish_reason == "stop" and cut.stop_reason == stop
        assert cut_text == text[: text.index(stop)] and cut.completion_tokens == 3
        pending = loop.submit("pending", [8, 9], max_tokens=10_000 - 3, ignore_eos=True)
        await anext(pending.deltas())
    finally:
        await loop.stop()
    assert not loop.alive
    assert [d.finish_reason async for d in pending.deltas()][-1] == "abort"
    assert pending.finished
