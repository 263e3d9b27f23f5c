"""Incremental tokenization: a prompt that extends a recently encoded one encodes only its new text.

Owns the prefix cache `tokenization.Preprocessor` consults before encoding a string: recently encoded
strings with their ids and the places where they may be cut, found again by a chained hash of their
leading chunks. Never renders templates or talks HTTP.

Why a cut is exact. `tokenizers` encodes a string in stages: split at the added tokens (leftmost-longest
match on the raw text), normalize each text segment, pre-tokenize it into pieces, run BPE on each piece on
its own. BPE never merges across pieces, so the ids of a string are the ids of its pieces in order. Let P be
a cached string, T the new one, L the length of their common prefix, and c a position where a piece of P
starts. Then ids(T) = ids(P)[:k] + encode(T[c:]) (k: P's first token at c) when T's stages agree with P's
before c and the stages run on T[c:] alone give what they give inside T. Each stage is local under the
conditions checked here:

* added tokens: the matches before c depend only on the text up to c + the longest added token, so the cut
  requires L >= c + that length; no match crosses c in P (c starts a piece), hence none in T.
* normalizers: only none, NFC/NFD/NFKC/NFKD and Lowercase are accepted, and T[c] must be ASCII, a starter
  that never composes with or reorders against what precedes it, so normalize(a + b) = normalize(a) +
  normalize(b) at c.
* pre-tokenizers: regex splits (`Split` with behaviour Isolated, `ByteLevel`) whose patterns have no anchor,
  lookbehind or backreference and no lookahead but `(?!\\S)`, so matching restarts at each match end and
  reads ahead only to the end of the run of similar characters it is in, plus one; `Metaspace` with
  split; `Digits`. The cut is taken only where the piece before c ends in a non-space character and the
  piece at c starts with a printable ASCII character, or with one space followed by a non-space (for
  Metaspace: with a space, so that encoding T[c:] alone prepends nothing), and only where the two pieces
  after c lie wholly inside the common prefix with a character to spare: the text every regex decision
  before c can read is then the same in T as in P. Whitespace runs are never cut (that is where
  `\\s+(?!\\S)` looks ahead).
* model: BPE without dropout; `ignore_merges` and byte fallback act per piece.

Tokenizers these conditions exclude (no pre-tokenizer, like Llama 2's converted tokenizer, or Gemma's,
whose split pattern never matches once its normalizer has replaced the spaces, so BPE runs over a whole
segment) keep the segment cache or whole encodes. The argument above leans on how the accepted regexes
read ahead, so every tokenizer also passes a load-time self-test (prompts cut at every kind of place,
compared with whole encodes) before the cache is used, and the property tests in
tests/test_tokenization_incremental.py run it against real tokenizers.

With special tokens (completions), ids = head + ids(text without special tokens) + tail, with head and tail
read from the post-processor at load and checked by the self-test.

Split encodes use the same argument to encode one long text in parallel: its parts (text[s_i : s_i+1 +
overlap], the last one to the end) go to `encode_batch` at once, which runs them on the tokenizer's own
threads with the GIL released. Each part is a cached string P whose common prefix with text[s_i:] is all of
P, so ids(text[s_i:]) = ids(P)[:k] + ids(text[s_i+1:]) when s_i+1 is a cut of P under the conditions above
(`join_token` checks them on P's encoding); by induction from the last part, the joined ids are the whole
text's. A join that cannot be proven falls back to one whole encode; a load-time self-test compares split
and whole encodes before split encodes are used, and property tests run them against real tokenizers.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tokenizers import Encoding, Tokenizer

from kvgate.indexer.shards import ShardedDict

# Expired head tags dropped per `PrefixCache.tag` call, at most (see there).
UNTAG_PER_TAG = 2
# Chars per chunk of the prefix index: a prompt is found again by any cached one sharing its first chunk.
CHUNK_CHARS = 128
# Chunks a plan hashes and looks up first; while all of them are found, twice as many more.
FIRST_WALK_CHUNKS = 16
# A cached prefix shorter than this is not worth the bookkeeping: the prompt is encoded whole.
MIN_REUSE_CHARS = 128
# Candidate cuts are recorded every this many tokens (a cut lands at most this far before the common end):
# finding them is a Python loop over the encoding, so a sparser stride costs less per new token.
CUT_STRIDE_TOKENS = 32
# Split encoding: a text left to encode that is at least 2x this long is encoded in parts of at least this
# many chars, all in one `encode_batch` call (which runs them on the tokenizer's own threads, one per core),
# and the parts are joined where a cut is exact. Each part but the last runs this far past the next part's
# start, so that the join can be checked as the prefix cache checks a cut; a part's start is looked for
# this far from its ideal place (a space before a word).
SPLIT_MIN_CHARS = 4096
SPLIT_OVERLAP_CHARS = 512
SPLIT_SEARCH_CHARS = 1024
# A space that starts a word piece: after a printable non-space character, before a letter.
_WORD_START = re.compile(r"(?<=[^\s]) (?=[^\W\d_])")

_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
_ALLOWED_LOOKAHEAD = "(?!\\S)"


@dataclass(frozen=True)
class IncrementalInfo:
    """`enabled` False with the `reason` when every prompt is encoded whole; counters since load."""

    enabled: bool
    reason: str
    entries: int
    bytes: int
    incremental: int  # encodes that reused a cached prefix
    whole: int  # encodes of a whole string (no usable cached prefix)
    reused_tokens: int
    encoded_chars: int  # characters actually run through the tokenizer
    split_joined: int = 0  # texts encoded in parallel parts and joined
    split_fallbacks: int = 0  # split encodes whose join could not be proven exact (re-encoded whole)
    heads: int = 0  # long prompts whose head only was encoded, to route on (`PrefixCache.head`)
    head_fallbacks: int = 0  # heads with no provable cut (the prompt was encoded whole)
    heads_completed: int = 0  # heads that did not decide the route: the prompt was then encoded whole
    heads_deepened: int = 0  # heads that did not decide the route: a longer head was encoded past them
    prefix_routed: int = 0  # prompts routed on a cached prefix, their rest encoded after forwarding
    prefix_completed: int = 0  # prompts whose cached prefix did not decide the route (encoded before forwarding)


# -- which tokenizers qualify -------------------------------------------------------------------------------


def unsupported_reason(backend: Tokenizer) -> str:
    """Why a cut could differ from the whole-string encode for this tokenizer, or "" when it cannot."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"the model is {model.get('type')}, not BPE"
    if model.get("dropout"):
        return "BPE dropout is set"
    normalizer_reason = _normalizer_reason(spec.get("normalizer"))
    if normalizer_reason:
        return normalizer_reason
    pre_reason = _pre_tokenizer_reason(spec.get("pre_tokenizer"))
    if pre_reason:
        return pre_reason
    identity = _is_identity_normalizer(spec.get("normalizer"))
    for token in spec.get("added_tokens") or []:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} has lstrip/rstrip/single_word"
        if token.get("normalized") and not identity:
            return f"added token {token.get('content')!r} is matched after normalization"
    return ""


def uses_metaspace(backend: Tokenizer) -> bool:
    return '"Metaspace"' in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))


def normalizes(backend: Tokenizer) -> bool:
    """Whether the tokenizer's normalizer may change a text (an empty sequence does not)."""
    return not _is_identity_normalizer(json.loads(backend.to_str()).get("normalizer"))


def _is_identity_normalizer(normalizer: Any) -> bool:
    if normalizer is None:
        return True
    return normalizer.get("type") == "Sequence" and all(map(_is_identity_normalizer, normalizer["normalizers"]))


def _normalizer_reason(normalizer: Any) -> str:
    if normalizer is None:
        return ""
    kind = normalizer.get("type")
    if kind == "Sequence":
        return next(filter(None, map(_normalizer_reason, normalizer.get("normalizers", []))), "")
    if kind in _NORMALIZERS:
        return ""
    return f"normalizer {kind} may act across a cut"


def _pre_tokenizer_reason(pre: Any) -> str:
    if pre is None:
        return "no pre-tokenizer: BPE runs over whole segments"
    kind = pre.get("type")
    if kind == "Sequence":
        return next(filter(None, map(_pre_tokenizer_reason, pre.get("pretokenizers", []))), "")
    if kind == "ByteLevel":
        return "ByteLevel adds a prefix space" if pre.get("add_prefix_space") else ""
    if kind == "Metaspace":
        return "" if pre.get("split", True) else "Metaspace without split: BPE runs over whole segments"
    if kind == "Digits":
        return ""
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        if "Regex" not in pattern:
            return f"Split on the literal {pattern.get('String')!r} (only regex splits are analysed)"
        if pre.get("behavior") != "Isolated" or pre.get("invert"):
            return f"Split behaviour {pre.get('behavior')} (invert={pre.get('invert')}) is not Isolated"
        return regex_reason(pattern["Regex"])
    return f"pre-tokenizer {kind} is not analysed"


def regex_reason(pattern: str) -> str:
    """Why a split regex's decisions might depend on text far from where it matches, or ""."""
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            escaped = pattern[i + 1 : i + 2]
            if not in_class and escaped in ("b", "B", "A", "z", "Z", "G", "K"):
                return f"the split regex uses the anchor \\{escaped}"
            if not in_class and (escaped.isdigit() and escaped != "0" or escaped in ("k", "g")):
                return "the split regex uses a backreference"
            i += 2
            continue
        if in_class:
            if char == "[":
                # POSIX classes / nested sets: skip the bracketed name conservatively.
                end = pattern.find("]", i + 1)
                i = end + 1 if end > 0 and pattern[i + 1 : i + 2] == ":" else i + 1
                continue
            if char == "]":
                in_class = False
            i += 1
            continue
        if char == "[":
            in_class = True
            i += 1
            # A leading ^ or ] belongs to the class.
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":
                i += 1
            continue
        if char in "^$":
            return f"the split regex uses the anchor {char}"
        if pattern.startswith(("(?<=", "(?<!"), i):
            return "the split regex uses a lookbehind"
        if pattern.startswith(("(?=", "(?!"), i):
            if not pattern.startswith(_ALLOWED_LOOKAHEAD, i):
                return "the split regex uses a lookahead other than (?!\\S)"
            i += len(_ALLOWED_LOOKAHEAD)
            continue
        i += 1
    return ""


# -- where a cached string may be cut --------------------------------------------------------------------


def _cut_start_ok(text: str, c: int, metaspace: bool) -> bool:
    """The local character conditions for cutting before text[c] (see the module docstring)."""
    before = text[c - 1]
    if before.isspace() or not before.isprintable():
        return False
    first = text[c]
    if first == " ":
        following = text[c + 1 : c + 2]
        return following != "" and not following.isspace() and following.isprintable()
    return not metaspace and "!" <= first <= "~"


def _second_piece_after(words: Sequence[int | None], i: int) -> int:
    """The first token of the second piece after the one token i is in (len(words) when there is none)."""
    j, seen = i + 1, 0
    while j < len(words):
        if words[j] != words[j - 1]:
            seen += 1
            if seen == 2:
                break
        j += 1
    return j


def find_cuts(
    text: str, encoding: Encoding, base_char: int, base_token: int, metaspace: bool, skip_chars: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Candidate cuts of `encoding` (the encoding of text[base_char:]): char positions, token indices and
    the char position the common prefix must exceed for each (all in whole-text coordinates).

    Cuts start at every CUT_STRIDE_TOKENS-th token (from the next piece start), past `skip_chars`."""
    words = encoding.word_ids
    count = len(words)
    chars: list[int] = []
    tokens: list[int] = []
    limits: list[int] = []
    i = 1
    while i < count:
        # The next piece start at or after token i.
        while i < count and (words[i] == words[i - 1] or words[i] is None):
            i += 1
        if i >= count:
            break
        start = encoding.token_to_chars(i)
        c = base_char + start[0] if start is not None else -1
        if c <= base_char + skip_chars or not _cut_start_ok(text, c, metaspace):
            i += 1
            continue
        # The start of the second piece after the one at c: the common prefix must go past it.
        j = _second_piece_after(words, i)
        after = encoding.token_to_chars(j) if j < count else None
        limit = base_char + after[0] if after is not None else len(text) + 1
        chars.append(c)
        tokens.append(base_token + i)
        limits.append(limit)
        i += CUT_STRIDE_TOKENS
    return chars, tokens, limits


def join_token(text: str, encoding: Encoding, c: int, metaspace: bool, margin: int) -> int | None:
    """The index of the token of `encoding` (the encoding of `text`, a prefix of a longer string whose rest
    is unknown) at which the longer string may be cut before text[c], or None when the cut is not provably
    exact: the conditions of the module docstring, with `text` as the cached string and its length as the
    common prefix (`margin`: the longest added token)."""
    if c <= 0 or c + margin > len(text) or not _cut_start_ok(text, c, metaspace):
        return None
    token = encoding.char_to_token(c)
    if token is None or token == 0 or encoding.token_to_chars(token)[0] != c:
        return None
    words = encoding.word_ids
    if words[token] is None or words[token] == words[token - 1]:
        return None
    # The second piece after c must start inside text, with a character to spare.
    j = _second_piece_after(words, token)
    if j >= len(words):
        return None
    after = encoding.token_to_chars(j)
    return token if after is not None and after[0] < len(text) else None


def split_starts(text: str, parts: int, metaspace: bool, min_chars: int = SPLIT_MIN_CHARS) -> list[int]:
    """Where the parts of a split encode of `text` start (0 first): near equal shares of at least
    `min_chars`, at word starts."""
    starts = [0]
    for i in range(1, parts):
        ideal = len(text) * i // parts
        if ideal - starts[-1] < min_chars or len(text) - ideal < min_chars:
            continue
        match = _WORD_START.search(text, ideal, ideal + SPLIT_SEARCH_CHARS)
        if match is not None and _cut_start_ok(text, match.start(), metaspace):
            starts.append(match.start())
    return starts


# -- the cache -------------------------------------------------------------------------------------------


# An entry's ids and cuts are arrays, not lists: an array holds no Python objects, so the garbage collector
# neither tracks nor walks it. Lists of the ids of a few hundred long prompts (millions of references) made a
# full collection walk them all, stalling the event loop and every thread for 15-25 ms.
Cuts = tuple["array[int]", "array[int]", "array[int]"]


def _no_cuts() -> Cuts:
    return array("q"), array("q"), array("q")


def _extended(cuts: Cuts, chars: Iterable[int], tokens: Iterable[int], limits: Iterable[int]) -> Cuts:
    return cuts[0] + array("q", chars), cuts[1] + array("q", tokens), cuts[2] + array("q", limits)


_serials = itertools.count(1)


class _Entry:
    __slots__ = ("bytes", "chars", "head_end", "ids", "keys", "limits", "serial", "tag", "tag_expiry", "text", "tokens")

    def __init__(self, text: str, ids: array[int], cuts: Cuts, keys: array[int], head_end: int | None = None) -> None:
        self.text = text
        self.ids = ids
        # Its name in the cache's indexes, which map keys to serials (ints) rather than to entries: a dict of
        # ints only is not tracked by the garbage collector, while one holding 400k entries would have each
        # collection that reaches it walk them all, on whatever thread, the event loop's included.
        self.serial = next(_serials)
        # The chars its ids cover: all of them, or for a head (`PrefixCache.head`) the head's, whose ids are
        # those inside the longer text, so the entry is only ever cut, never taken whole.
        self.head_end = len(text) if head_end is None else head_end
        # A head's: where its whole text was sent (`PrefixCache.tag`), until tag_expiry (time.monotonic()).
        self.tag: object | None = None
        self.tag_expiry = 0.0
        self.chars, self.tokens, self.limits = cuts
        self.keys = keys
        # The string, the ids, three cut arrays, the index keys and their dict entries.
        self.bytes = sys.getsizeof(text) + 4 * len(ids) + 3 * 8 * len(self.chars) + 108 * len(keys) + 400

    @property
    def whole(self) -> bool:
        return self.head_end == len(self.text)


def chunk_keys(text: str, known: Sequence[int] = ()) -> list[int]:
    """Chained hashes of text's whole CHUNK_CHARS chunks; `known` are those of a prefix already hashed."""
    keys = list(known)
    previous = keys[-1] if keys else 0
    for start in range(len(keys) * CHUNK_CHARS, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS):
        previous = hash((previous, text[start : start + CHUNK_CHARS]))
        keys.append(previous)
    return keys


def common_prefix_length(a: str, b: str, start: int = 0) -> int:
    """len of the common prefix of a and b, knowing a[:start] == b[:start]."""
    low, high = start, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass
class Plan:
    """What encoding `text` takes: its ids up to char `cut` are `prefix_ids`; the rest is encoded."""

    text: str
    cut: int
    prefix_ids: array[int]
    keys: list[int]  # the chain hashes of its first chunks: those `plan` looked up (all, once stored whole)
    entry_cuts: Cuts
    done: bool = False  # the text was cached whole: prefix_ids are all its ids
    # The text shares more than its head with a head's text (a prompt whose rest was never encoded).
    beyond_head: bool = False
    stored: _Entry | None = None  # the entry `finish` stored for the text

    @property
    def tail(self) -> str:
        return self.text[self.cut :]


class PrefixCache:
    """Recently encoded strings (ids without special tokens) found again by their leading chunks.

    Thread-safe. `plan` finds the longest usable cached prefix; `finish` adds the encoding of the rest and
    stores the result. Sizes are approximate (Python object sizes)."""

    def __init__(
        self,
        backend: Tokenizer,
        budget_bytes: int,
        metaspace: bool,
        split_min_chars: int = SPLIT_MIN_CHARS,
        split_overlap_chars: int = SPLIT_OVERLAP_CHARS,
    ) -> None:
        self._backend = backend
        self.split_min_chars = split_min_chars
        self.split_overlap_chars = split_overlap_chars
        self._budget = budget_bytes
        self._metaspace = metaspace
        added = backend.get_added_tokens_decoder().values()
        self._added_margin = max((len(token.content) for token in added), default=0)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # serial -> entry, LRU order
        # chunk chain hash -> serial of the most recent entry holding that chain; sharded, as hundreds of
        # thousands of keys are usual (a full budget of 8k-token prompts) and one dict's rebuild would stall
        # the loop (`ShardedDict`)
        self._index: ShardedDict[int] = ShardedDict()
        self._tagged: ShardedDict[int] = ShardedDict()  # the same, for tagged heads only (see `tag`)
        self._tag_order: deque[_Entry] = deque()  # tagged heads, oldest tag first (about: ttls vary)
        self._bytes = 0
        self._lock = threading.Lock()
        self._incremental = self._whole = self._reused_tokens = self._encoded_chars = 0
        self._split_joined = self._split_fallbacks = 0
        self._heads = self._head_fallbacks = 0

    @property
    def metaspace(self) -> bool:
        return self._metaspace

    def plan(self, text: str) -> Plan:
        # Chain hashes: a hit at depth d means (barring collisions, checked later) that the first d chunks
        # are shared. Hashed a batch at a time while every key is found, so a new prompt hashes one batch
        # (its plan's keys stop there); `_complete` hashes the rest of a text encoded whole.
        keys: list[int] = []
        serial: int | None = None
        depth = 0
        batch = FIRST_WALK_CHUNKS
        while True:
            keys = chunk_keys(text[: (len(keys) + batch) * CHUNK_CHARS], keys)
            with self._lock:
                found, walked = self._index.deepest(keys[depth:])
            if found is not None:
                serial = found
            depth += walked
            if depth < len(keys) or len(keys) * CHUNK_CHARS > len(text) - CHUNK_CHARS:
                break
            batch *= 2
        entry = None
        if serial is not None:
            with self._lock:
                entry = self._entries.get(serial)
                if entry is not None:
                    self._entries.move_to_end(serial)
        return self._plan(text, keys, entry, depth)

    def shared(self, plan: Plan) -> tuple[object, int] | None:
        """For an encoded `plan`: the tag of the head (`tag`) whose text it shares most of, and how many of
        its first ids are provably that text's too (so went where the tag says); None when no live tagged
        head shares more than a cut with it."""
        stored = plan.stored
        found = self._tagged_common(plan.text, plan.keys if stored is None else stored.keys)
        if found is None:
            return None
        tag, common = found
        cuts = (stored.chars, stored.tokens, stored.limits) if stored is not None else plan.entry_cuts
        tokens = self._shared_tokens(cuts, common)
        return (tag, tokens) if tokens else None

    def holder(self, plan: Plan) -> tuple[object, int] | None:
        """For a plan not yet encoded: the tag of the live head (`tag`) whose text it shares most of, and how
        many of their first chars are the same; None when no live tagged head shares a chunk with it."""
        return self._tagged_common(plan.text, plan.keys)

    def _tagged_common(self, text: str, keys: Sequence[int]) -> tuple[object, int] | None:
        """The tag of the live tagged head found deepest by `keys` (`text`'s chunks), and how many first
        chars `text` shares with its text."""
        if not self._tag_order:
            return None
        with self._lock:
            serial, depth = self._tagged.deepest(keys)
            tagged = None if serial is None else self._entries.get(serial)
        if tagged is None or tagged.tag is None or time.monotonic() >= tagged.tag_expiry:
            return None
        shared = depth * CHUNK_CHARS
        if text[:shared] != tagged.text[:shared]:  # a hash collision
            return None
        return tagged.tag, common_prefix_length(text, tagged.text, shared)

    def _plan(self, text: str, keys: list[int], entry: _Entry | None, depth: int) -> Plan:
        if entry is None:
            return Plan(text, 0, array("i"), keys, _no_cuts())
        shared = depth * CHUNK_CHARS
        if text[:shared] != entry.text[:shared]:  # a hash collision
            return Plan(text, 0, array("i"), keys, _no_cuts())
        common = common_prefix_length(text, entry.text, shared)
        if common == len(text) == len(entry.text) and entry.whole:
            return Plan(text, common, entry.ids, keys, (entry.chars, entry.tokens, entry.limits), done=True)
        beyond_head = not entry.whole and common > entry.head_end
        usable = self._usable_cuts((entry.chars, entry.tokens, entry.limits), common)
        if usable == 0 or entry.chars[usable - 1] < MIN_REUSE_CHARS:
            return Plan(text, 0, array("i"), keys, _no_cuts(), beyond_head=beyond_head)
        cut, token = entry.chars[usable - 1], entry.tokens[usable - 1]
        cuts = (entry.chars[:usable], entry.tokens[:usable], entry.limits[:usable])
        return Plan(text, cut, entry.ids[:token], keys, cuts, beyond_head=beyond_head)

    def finish(self, plan: Plan, tail: Encoding | None) -> list[int]:
        """The ids of plan.text: its cached prefix + `tail` (the encoding of plan.tail); stores them."""
        if plan.done or tail is None:
            ids = plan.prefix_ids
            with self._lock:
                self._incremental += 1
                self._reused_tokens += len(ids)
            return ids.tolist()
        cuts = find_cuts(plan.text, tail, plan.cut, len(plan.prefix_ids), self._metaspace)
        return self._complete(plan, tail.ids, cuts)

    def finish_split(self, plan: Plan, parts: int) -> list[int]:
        """`finish` for a plan whose tail is encoded here, in up to `parts` parts at once (`encode_batch`,
        the GIL released, the parts on the tokenizer's threads), joined where the cut is proven exact (see
        `join_token`); when a join is not, the tail is encoded whole."""
        tail = plan.tail
        starts = split_starts(tail, parts, self._metaspace, self.split_min_chars)
        if len(starts) < 2:
            return self._finish_whole(plan)
        ends = [start + self.split_overlap_chars for start in starts[1:]] + [len(tail)]
        texts = [tail[start:end] for start, end in zip(starts, ends)]
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        ids: list[int] = []
        chars: list[int] = []
        tokens: list[int] = []
        limits: list[int] = []
        for i, (start, text, encoding) in enumerate(zip(starts, texts, encodings)):
            base_char, base_token = plan.cut + start, len(plan.prefix_ids) + len(ids)
            part_cuts = find_cuts(plan.text, encoding, base_char, base_token, self._metaspace)
            if i + 1 == len(starts):
                ids += encoding.ids
                part = zip(*part_cuts)
            else:
                join = join_token(text, encoding, starts[i + 1] - start, self._metaspace, self._added_margin)
                if join is None:
                    with self._lock:
                        self._split_fallbacks += 1
                    return self._finish_whole(plan)
                ids += encoding.ids[:join]
                # A cut whose next two pieces end before the join: those pieces are the whole text's.
                end = plan.cut + starts[i + 1]
                part = ((c, t, limit) for c, t, limit in zip(*part_cuts) if limit <= end)
            for c, t, limit in part:
                chars.append(c)
                tokens.append(t)
                limits.append(limit)
        with self._lock:
            self._split_joined += 1
        return self._complete(plan, ids, (chars, tokens, limits))

    def head(
        self, plan: Plan, chars: int, overlap: int | None = None, released: bool = True
    ) -> tuple[list[int], int, object] | None:
        """The ids of plan.text up to a cut near char plan.cut + `chars`, that cut and the entry stored for it
        (to `tag`), encoding only that far (plus `overlap` chars, default the split encodes', for the join to
        be proven): exact whatever the rest of the text is, by the argument split encodes' joins rest on
        (`join_token`). Stored as a head entry, so that encoding the whole text next reuses it. None when the
        tail is too short or no cut there can be proven. `released`: encode with the GIL released (on a
        thread other than the event loop's)."""
        if overlap is None:
            overlap = self.split_overlap_chars
        tail = plan.tail
        match = _WORD_START.search(tail, chars, min(chars + SPLIT_SEARCH_CHARS, len(tail) - overlap))
        if match is None:
            return None
        cut = match.start()
        text = tail[: cut + overlap]
        if released:
            encoding = self._backend.encode_batch([text], add_special_tokens=False)[0]
        else:
            encoding = self._backend.encode(text, add_special_tokens=False)
        join = join_token(text, encoding, cut, self._metaspace, self._added_margin)
        if join is None:
            with self._lock:
                self._head_fallbacks += 1
            return None
        end = plan.cut + cut
        found = find_cuts(plan.text, encoding, plan.cut, len(plan.prefix_ids), self._metaspace)
        kept = [(c, t, limit) for c, t, limit in zip(*found) if limit <= end]
        ids = plan.prefix_ids + array("i", encoding.ids[:join])
        # The whole text, found again by all its chunks: a prompt sharing more than the head learns from
        # `plan` how much it shares with this one, and so where its blocks were sent (see `tag`).
        cuts = _extended(plan.entry_cuts, *(zip(*kept) if kept else ((), (), ())))
        # Keyed as far as the head at least: a later prompt sharing more than the head finds it by those
        # chunks, and how much more it shares by comparing the texts.
        keys = chunk_keys(plan.text[:end], plan.keys)
        entry = _Entry(plan.text, ids, cuts, array("q", keys), head_end=end)
        with self._lock:
            self._heads += 1
            self._encoded_chars += len(text)
            self._store(entry)
        return ids.tolist(), end, entry

    def tag(self, entry: object, tag: object, ttl: float) -> None:
        """The whole text of `entry` (a head's, from `head`) was sent where `tag` says: for `ttl` seconds, a
        plan for a text sharing more than its head carries the tag and how much it shares."""
        assert isinstance(entry, _Entry)
        with self._lock:
            now = time.monotonic()
            entry.tag, entry.tag_expiry = tag, now + ttl
            # Its own index: a later prompt's entry takes over the chunks it shares in the main one. Expired
            # tags go a few per call (each drops a whole text's chunk keys, ~800 for a 14k-token prompt, on
            # the event loop): one added, up to UNTAG_PER_TAG dropped, so the backlog never grows, and
            # `shared` ignores an expired tag still listed.
            for _ in range(UNTAG_PER_TAG):
                if not self._tag_order or self._tag_order[0].tag_expiry > now:
                    break
                self._untag(self._tag_order.popleft())
            if entry.serial in self._entries:
                self._tagged.put_all(entry.keys, entry.serial)
                self._tag_order.append(entry)

    def _untag(self, entry: _Entry) -> None:
        self._tagged.discard_all(entry.keys, entry.serial)

    def _finish_whole(self, plan: Plan) -> list[int]:
        return self.finish(plan, self._backend.encode_batch([plan.tail], add_special_tokens=False)[0])

    def _complete(self, plan: Plan, tail_ids: list[int], cuts: tuple[list[int], list[int], list[int]]) -> list[int]:
        ids = plan.prefix_ids + array("i", tail_ids)
        chars, tokens, limits = cuts
        keys = array("q", chunk_keys(plan.text, plan.keys))
        entry = _Entry(plan.text, ids, _extended(plan.entry_cuts, chars, tokens, limits), keys)
        plan.stored = entry
        with self._lock:
            if plan.cut:
                self._incremental += 1
                self._reused_tokens += len(plan.prefix_ids)
            else:
                self._whole += 1
            self._encoded_chars += len(plan.text) - plan.cut
            self._store(entry)
        return ids.tolist()

    def _usable_cuts(self, cuts: Cuts, common: int) -> int:
        """How many of `cuts` a text sharing their string's first `common` chars may use: those whose next
        two pieces end inside the common prefix, with room for an added token."""
        chars, _, limits = cuts
        usable = bisect.bisect_left(limits, common)
        while usable > 0 and chars[usable - 1] + self._added_margin > common:
            usable -= 1
        return usable

    def _shared_tokens(self, cuts: Cuts, shared_chars: int) -> int:
        """How many first ids a text with these cuts shares with any text sharing its first `shared_chars`
        chars: those before its last usable cut."""
        usable = self._usable_cuts(cuts, shared_chars)
        return cuts[1][usable - 1] if usable else 0

    def _store(self, entry: _Entry) -> None:
        if entry.bytes > self._budget or len(entry.text) < MIN_REUSE_CHARS:
            return
        self._entries[entry.serial] = entry
        self._bytes += entry.bytes
        self._index.put_all(entry.keys, entry.serial)
        while self._bytes > self._budget:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.bytes
            self._index.discard_all(old.keys, old.serial)
            if old.tag is not None:
                self._untag(old)

    def counters(self) -> tuple[int, int, int, int, int, int, int, int, int, int]:
        with self._lock:
            return (
                len(self._entries),
                self._bytes,
                self._incremental,
                self._whole,
                self._reused_tokens,
                self._encoded_chars,
                self._split_joined,
                self._split_fallbacks,
                self._heads,
                self._head_fallbacks,
            )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self._tagged.clear()
            self._tag_order.clear()
            self._bytes = 0


def special_token_frame(backend: Tokenizer, probes: Iterable[str]) -> tuple[list[int], list[int]] | None:
    """(head, tail) such that encode(x, add_special_tokens=True) = head + encode(x, False) + tail for every
    probe, or None when the post-processor does something else."""
    frame: tuple[list[int], list[int]] | None = None
    for probe in probes:
        plain = backend.encode(probe, add_special_tokens=False).ids
        framed = backend.encode(probe, add_special_tokens=True).ids
        found = None
        for start in range(len(framed) - len(plain) + 1):
            if framed[start : start + len(plain)] == plain:
                found = (framed[:start], framed[start + len(plain) :])
                break
        if found is None or (frame is not None and found != frame):
            return None
        frame = found
    return frame


def self_test_pairs(samples: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(cached, new) string pairs where new extends or diverges from cached at every kind of place."""
    pattern = re.compile(r"\s+|\w+|[^\w\s]+")
    for sample in samples:
        if len(sample) < 2 * MIN_REUSE_CHARS:
            sample = (sample + " ") * (2 * MIN_REUSE_CHARS // max(1, len(sample)) + 1)
        yield sample, sample
        ends = [match.end() for match in pattern.finditer(sample)]
        for end in ends[len(ends) // 3 :: max(1, len(ends) // 8)]:
            # Extend at a piece end, inside a piece, and diverge just after it.
            yield sample[:end], sample
            yield sample[: end + 1], sample
            yield sample, sample[:end] + "x" + sample[end:]
            yield sample, sample[:end] + " \n" + sample[end:]


class TokenizationCollector(Collector):
    """/metrics families for a `Preprocessor`'s tokenizer caches, read at scrape time (never on the
    request path). Register it on the gateway's registry: ``registry.register(TokenizationCollector(p))``."""

    def __init__(self, preprocessor: Any) -> None:
        self._preprocessor = preprocessor

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        info: IncrementalInfo = self._preprocessor.incremental_info()
        enabled = GaugeMetricFamily(
            "kvgate_tokenizer_incremental_enabled", "1 when prompts extending a cached one encode only the new text"
        )
        enabled.add_metric([], 1.0 if info.enabled else 0.0)
        encodes = CounterMetricFamily(
            "kvgate_tokenizer_encodes", "Prompt encodes by the prefix cache, by kind", labels=("kind",)
        )
        encodes.add_metric(["incremental"], info.incremental)
        encodes.add_metric(["whole"], info.whole)
        reused = CounterMetricFamily("kvgate_tokenizer_reused_tokens", "Token ids taken from a cached prefix")
        reused.add_metric([], info.reused_tokens)
        encoded = CounterMetricFamily("kvgate_tokenizer_encoded_chars", "Characters run through the tokenizer")
        encoded.add_metric([], info.encoded_chars)
        split = CounterMetricFamily(
            "kvgate_tokenizer_split_encodes",
            "Long texts encoded in parallel parts, by result (joined; fallback: re-encoded whole)",
            labels=("result",),
        )
        split.add_metric(["joined"], info.split_joined)
        split.add_metric(["fallback"], info.split_fallbacks)
        heads = CounterMetricFamily(
            "kvgate_tokenizer_head_encodes",
            "Long prompts whose head only was encoded to route them, by result (routed: the head decided the "
            "route, the rest was never encoded; completed: encoded whole after all; deepened: a longer head "
            "followed; fallback: no exact cut)",
            labels=("result",),
        )
        heads.add_metric(["routed"], info.heads - info.heads_completed - info.heads_deepened)
        heads.add_metric(["completed"], info.heads_completed)
        heads.add_metric(["deepened"], info.heads_deepened)
        heads.add_metric(["fallback"], info.head_fallbacks)
        prefixes = CounterMetricFamily(
            "kvgate_tokenizer_prefix_routes",
            "Prompts extending a cached one by a short rest, by result (routed: on the cached prefix's ids, the "
            "rest encoded after forwarding; completed: the prefix did not decide, the rest was encoded first)",
            labels=("result",),
        )
        prefixes.add_metric(["routed"], info.prefix_routed)
        prefixes.add_metric(["completed"], info.prefix_completed)
        size = GaugeMetricFamily("kvgate_tokenizer_cache_bytes", "Approximate size of the prefix cache")
        size.add_metric([], info.bytes)
        entries = GaugeMetricFamily("kvgate_tokenizer_cache_entries", "Prompts held by the prefix cache")
        entries.add_metric([], info.entries)
        segments = self._preprocessor.segment_cache_info()
        segment_lookups = CounterMetricFamily(
            "kvgate_tokenizer_segment_lookups", "Segment-cache lookups, by result", labels=("result",)
        )
        segment_lookups.add_metric(["hit"], segments.hits)
        segment_lookups.add_metric(["miss"], segments.misses)
        return [enabled, encodes, reused, encoded, split, heads, prefixes, size, entries, segment_lookups]
