"""Trace replay: hash ids -> real shared token prefixes, lengths, arrival schedule."""

from __future__ import annotations

import json

import pytest

from kvgate.loadtest.corpus import Vocabulary, VocabularyError, load_tokenizer
from kvgate.loadtest.trace import (
    DEFAULT_TRACE,
    ReplayConfig,
    TraceError,
    TracePrompts,
    TraceRequest,
    arrival_schedule,
    load_trace,
    parse_line,
    trace_block_tokens,
)
from tests.helpers import TINY_MODEL


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TINY_MODEL))


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    return Vocabulary.from_tokenizer(tokenizer)


def req(ts: int, ids: list[int], input_length: int | None = None, out: int = 8) -> TraceRequest:
    return TraceRequest(ts, input_length if input_length is not None else 512 * len(ids), out, tuple(ids))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_vocabulary_words_are_single_tokens(tokenizer, vocabulary):
    assert len(vocabulary.words) >= 32
    for word in vocabulary.words[:200]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1


WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu apple banana cherry grape lemon "
    "mango melon olive peach pear plum"
).split()


def merging_tokenizer(words: list[str]):
    """A real BPE with no pre-tokenizer whose merges join neighbouring words into one token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(set(" " + "".join(words))))}
    merges = []

    def add(a: str, b: str) -> None:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))

    for w in words:
        piece = " "
        for ch in w:
            add(piece, ch)
            piece += ch
    for a, b in zip(words, words[1:]):
        add(" " + a, " " + b)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges)))


def test_vocabulary_refuses_a_tokenizer_that_merges_across_words():
    tok = merging_tokenizer(WORDS)
    assert tok.encode(" alpha bravo") != tok.encode(" alpha") + tok.encode(" bravo")
    with pytest.raises(VocabularyError, match="merges across word boundaries"):
        Vocabulary.from_tokenizer(tok)


def test_vocabulary_refuses_a_tokenizer_with_too_few_words():
    with pytest.raises(VocabularyError, match="single-token ' word' entries"):
        Vocabulary.from_tokenizer(merging_tokenizer(WORDS[:4]))


@pytest.mark.parametrize("length_scale", [1.0, 0.125, 0.3])
def test_equal_hash_ids_give_equal_token_prefixes(tokenizer, vocabulary, length_scale):
    cfg = ReplayConfig(length_scale=length_scale)
    prompts = TracePrompts(vocabulary, cfg, seed=7)
    bt = cfg.block_tokens
    a = req(0, [1, 2, 3, 4])
    b = req(0, [1, 2, 3, 9, 10])
    c = req(0, [5, 2, 3, 4])
    ta, tb, tc = (tokenizer.encode(prompts.prompt(r)) for r in (a, b, c))
    # Three shared ids -> exactly three blocks of shared tokens, then divergence.
    assert ta[: 3 * bt] == tb[: 3 * bt]
    assert common_prefix(ta, tb) < 4 * bt
    assert common_prefix(ta, tb) >= 3 * bt
    # A different first id shares nothing useful even if later ids agree.
    assert common_prefix(ta, tc) < bt
    # Same ids, same seed -> same text; another seed -> another text.
    assert prompts.prompt(a) == TracePrompts(vocabulary, cfg, seed=7).prompt(a)
    assert prompts.prompt(a) != TracePrompts(vocabulary, cfg, seed=8).prompt(a)


def test_block_text_is_stable_whatever_comes_before(tokenizer, vocabulary):
    prompts = TracePrompts(vocabulary, ReplayConfig(length_scale=0.125), seed=0)
    alone = tokenizer.encode(prompts.prompt(req(0, [42])))
    after = tokenizer.encode(prompts.prompt(req(0, [41, 42])))
    assert after[64:] == alone


@pytest.mark.parametrize("length_scale", [1.0, 0.125])
def test_synthetic_trace_lengths_are_honoured(tokenizer, vocabulary, length_scale):
    trace = load_trace()
    cfg = ReplayConfig(length_scale=length_scale, output_scale=0.5)
    prompts = TracePrompts(vocabulary, cfg, seed=0)
    for r in trace[:10]:
        n = len(tokenizer.encode(prompts.prompt(r)))
        expected = r.input_length * length_scale
        # Exact up to the rounding of each block to whole tokens.
        assert abs(n - expected) <= max(2, len(r.hash_ids)), (n, expected)
        assert n == prompts.prompt_tokens(r)
        assert prompts.max_tokens(r) == max(1, round(r.output_length * 0.5))


def test_partial_last_block_is_a_prefix_of_the_full_block(tokenizer, vocabulary):
    prompts = TracePrompts(vocabulary, ReplayConfig(length_scale=0.125), seed=0)
    full = tokenizer.encode(prompts.prompt(req(0, [3, 4])))
    part = tokenizer.encode(prompts.prompt(req(0, [3, 4], input_length=512 + 100)))
    assert len(part) == 64 + round(100 * 0.125) and full[: len(part)] == part


def test_schedule_scales_time_and_caps():
    trace = [req(ts, [i]) for i, ts in enumerate([1000, 1000, 1500, 3000, 9000])]
    sched = arrival_schedule(trace, ReplayConfig())
    assert [a.offset_s for a in sched] == [0.0, 0.0, 0.5, 2.0, 8.0]
    fast = arrival_schedule(trace, ReplayConfig(time_scale=0.25))
    assert [a.offset_s for a in fast] == [0.0, 0.0, 0.125, 0.5, 2.0]
    assert len(arrival_schedule(trace, ReplayConfig(max_requests=3))) == 3
    capped = arrival_schedule(trace, ReplayConfig(max_duration_s=2.0))
    assert [a.index for a in capped] == [0, 1, 2]
    skipped = arrival_schedule(trace, ReplayConfig(skip=2, max_requests=2))
    assert [(a.index, a.offset_s) for a in skipped] == [(2, 0.0), (3, 1.5)]
    assert arrival_schedule(trace, ReplayConfig(max_requests=0)) == []


def test_synthetic_trace_schedule_fits_a_window():
    trace = load_trace(DEFAULT_TRACE)
    assert len(trace) == 3993
    sched = arrival_schedule(trace, ReplayConfig(time_scale=0.1, max_duration_s=20.0))
    assert sched and sched[-1].offset_s < 20.0
    # The first ~200 s of the trace, replayed ten times faster.
    assert len(sched) == sum(1 for r in trace if (r.timestamp_ms - trace[0].timestamp_ms) * 1e-4 < 20.0)
    assert all(a.offset_s <= b.offset_s for a, b in zip(sched, sched[1:]))


@pytest.mark.parametrize(
    "line, match",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected an object"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "missing field 'hash_ids'"),
        ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', "non-negative"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": ["a"]}', "list of integers"),
        ('{"timestamp": "0", "input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp"),
        ('{"timestamp": 0, "input_length": 2, "output_length": 1, "hash_ids": [1, 2, 3]}', "more blocks than tokens"),
    ],
)
def test_bad_trace_lines_are_typed_errors(line, match):
    with pytest.raises(TraceError, match=match):
        parse_line(line, 3)


def test_bad_replay_config():
    with pytest.raises(ValueError):
        ReplayConfig(time_scale=0)
    with pytest.raises(ValueError):
        ReplayConfig(length_scale=-1)


def test_trace_round_trips_through_a_file(tmp_path):
    rows = [{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_trace(path) == [TraceRequest(5, 600, 3, (1, 2))]


def test_a_trace_of_another_block_size_is_read_at_its_size(tmp_path, vocabulary):
    """Dynamo's and aiperf's generators write Mooncake lines with their own block size (and may write
    fractional timestamps or extra fields): the replay reads every line at the size they all fit."""
    rows = [
        {"timestamp": 0.5, "input_length": 300, "output_length": 3, "hash_ids": [1, 2, 3], "session_id": "a"},
        {"timestamp": 20.25, "input_length": 250, "output_length": 2, "hash_ids": [1, 2]},
    ]
    path = tmp_path / "t128.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trace = load_trace(path)
    assert [r.block_tokens for r in trace] == [128, 128] and trace[1].timestamp_ms == 20.25
    assert trace_block_tokens(trace) == 128
    prompts = TracePrompts(vocabulary, ReplayConfig(length_scale=0.5))
    assert [prompts.block_token_counts(r) for r in trace] == [[64, 64, 22], [64, 61]]
    first, second = (prompts.block_words(h, 64) for h in (1, 2))
    assert len(first) == 64 and first != second
    assert prompts.prompt(trace[0]) == "".join(first + second + prompts.block_words(3, 64)[:22])
    assert prompts.prompt(trace[1]) == "".join(first + second[:61])
    sched = arrival_schedule(trace, ReplayConfig(time_scale=2.0))
    assert [x.offset_s for x in sched] == [0.0, pytest.approx(0.0395)]
    # 512-token lines stay 512 (the Mooncake default), and a trace no size fits is refused with its line.
    assert load_trace(DEFAULT_TRACE)[0].block_tokens == 512
    rows.append({"timestamp": 30, "input_length": 1000, "output_length": 1, "hash_ids": [9]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(TraceError, match="request 1: 3 hash ids for input_length 300"):
        load_trace(path)
