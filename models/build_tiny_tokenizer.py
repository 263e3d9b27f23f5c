"""Rebuild models/kvgate-tiny/: the small byte-level BPE tokenizer the tests and the demo use offline.

Owns: the training corpus recipe, the tokenizer's pipeline (pre-tokenizer, decoder, special tokens),
the ChatML chat template and every file in models/kvgate-tiny/. Never downloads anything and never
writes outside the output directory.

Training text (see README.md written beside the tokenizer):
  * the docstrings of every module, class and function of the Python standard library that runs this
    script (test suites, idlelib, lib2to3 and turtledemo left out), read with `ast` — nothing imported;
  * the full source of a fixed list of standard-library modules, so code prompts tokenize realistically;
  * a short multilingual sample written for this project (MULTILINGUAL_SAMPLE below).
The standard library is under the PSF License Agreement; the sample is the project's own (Apache-2.0).

Determinism: the corpus is assembled in sorted path order and hashed; the same Python version gives the
same corpus sha256 (recorded in the README) and `tokenizers`' BPE trainer gives the same merges for the
same corpus. `--check` rebuilds into a temporary directory and compares with the committed files.

Usage:  python models/build_tiny_tokenizer.py [--out models/kvgate-tiny] [--vocab-size 8192] [--check]
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import hashlib
import json
import pathlib
import platform
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "kvgate-tiny"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Ids 0, 1, 2 in this order: the trainer places special tokens first.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# The GPT-4o / Qwen2 split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newline runs, whitespace. Single digits keep numbers' token counts predictable.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__"})
SOURCE_MODULES = (
    "argparse.py",
    "asyncio/base_events.py",
    "asyncio/streams.py",
    "asyncio/tasks.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pathlib.py",
    "shutil.py",
    "subprocess.py",
    "textwrap.py",
    "typing.py",
)

MULTILINGUAL_SAMPLE = """\
The gateway reads the conversation, renders the chat template and counts the tokens before it picks a worker.
Could you summarise the last three messages? Sure — here is a short summary of what was said so far.
Please answer in JSON: {"status": "ok", "items": [1, 2, 3], "next": null}
Der Router wählt den Worker, der den längsten Präfix des Gesprächs bereits im Cache hält.
Le routeur choisit le serveur qui garde déjà le plus long préfixe de la conversation en mémoire.
El enrutador elige el servidor que ya guarda el prefijo más largo de la conversación.
O roteador escolhe o servidor que já guarda o prefixo mais longo da conversa.
Маршрутизатор выбирает сервер, который уже хранит самый длинный префикс разговора.
路由器选择已经缓存了对话最长前缀的服务器。每个块有六十四个词元。
ルーターは会話の最も長い接頭辞をすでにキャッシュしているサーバーを選びます。
라우터는 대화의 가장 긴 접두사를 이미 캐시에 보관한 서버를 선택합니다.
يختار الموجّه الخادم الذي يحتفظ بالفعل بأطول بادئة من المحادثة.
הנתב בוחר את השרת שכבר מחזיק את הקידומת הארוכה ביותר של השיחה.
राउटर उस सर्वर को चुनता है जिसके पास बातचीत का सबसे लंबा उपसर्ग पहले से है।
Ο δρομολογητής επιλέγει τον διακομιστή που ήδη κρατά το μακρύτερο πρόθεμα της συνομιλίας.
Yönlendirici, konuşmanın en uzun önekini zaten önbellekte tutan sunucuyu seçer.
Bộ định tuyến chọn máy chủ đã lưu sẵn tiền tố dài nhất của cuộc hội thoại.
Emoji and symbols: 🚀 ✅ ❌ 🙂 — “quotes”, ‘single’, …, €, £, ¥, °C, ±, ×, ÷, →, ⇒, ∑, ∞.
"""


@dataclass(frozen=True)
class Corpus:
    documents: list[str]
    sha256: str
    chars: int


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def collect_corpus(root: pathlib.Path) -> Corpus:
    documents: list[str] = []
    files = sorted(
        path for path in root.rglob("*.py") if not SKIPPED_STDLIB_DIRS.intersection(path.relative_to(root).parts)
    )
    for path in files:
        documents.extend(_docstrings(path.read_text(encoding="utf-8", errors="replace")))
    for name in SOURCE_MODULES:
        documents.append((root / name).read_text(encoding="utf-8"))
    documents.extend(MULTILINGUAL_SAMPLE.splitlines(keepends=True))
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    return Corpus(documents=documents, sha256=digest.hexdigest(), chars=sum(map(len, documents)))


def train_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE without one is lossless, so decode(encode(text)) == text for any
    # text, and a conversation's rendered prompt tokenizes the same whether or not a turn follows it.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.documents, trainer=trainer, length=len(corpus.documents))
    return tokenizer


# ChatML as Qwen2.5 renders it, minus the default system prompt. Content may be a string or a list of
# {"type": "text", "text": ...} parts; the loop over message['content'] sits directly in the messages loop
# so vLLM's content-format detection picks "openai" and passes part lists through unchanged.
CHAT_TEMPLATE = """\
{%- macro render_tools() %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments' }}
    {{- ' within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>' }}
{%- endmacro %}
{%- if tools and (messages | length == 0 or messages[0]['role'] != 'system') %}
    {{- '<|im_start|>system\\n' + render_tools() + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set ns = namespace(text='') %}
    {%- if message['content'] is string %}
        {%- set ns.text = message['content'] %}
    {%- elif message['content'] is not none %}
        {%- for part in message['content'] %}
            {%- if part is mapping and part['type'] == 'text' %}
                {%- set ns.text = ns.text + part['text'] %}
            {%- else %}
                {{- raise_exception('kvgate-tiny is text-only: every content part must be {"type": "text", "text": ...}') }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- if message['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + ns.text }}
        {%- if loop.first and tools %}
            {{- '\\n\\n' + render_tools() }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message['role'] == 'user' %}
        {{- '<|im_start|>user\\n' + ns.text + '<|im_end|>\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' + ns.text }}
        {%- if message['tool_calls'] %}
            {%- for tool_call in message['tool_calls'] %}
                {%- if ns.text or not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call['function'] is defined %}
                    {%- set tool_call = tool_call['function'] %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call['name'] + '", "arguments": ' }}
                {%- if tool_call['arguments'] is string %}
                    {{- tool_call['arguments'] }}
                {%- else %}
                    {{- tool_call['arguments'] | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message['role'] == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + ns.text + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('unknown message role: ' + message['role'] | string) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MAX_POSITION_EMBEDDINGS = 32768


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(vocab_size: int) -> dict:
    # A Llama-shaped config (as Llama 3, which pairs it with a byte-level PreTrainedTokenizerFast) so
    # AutoConfig can read it; there are no weights. Servers read max_position_embeddings for the context
    # length. Not Qwen2-shaped: transformers 5 forces its own Qwen2Tokenizer pipeline (NFC normalizer)
    # on model_type "qwen2" instead of loading tokenizer.json as written.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "eos_token_id": SPECIAL_TOKENS.index(IM_END),
    }


def generation_config() -> dict:
    return {
        "eos_token_id": [SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(ENDOFTEXT)],
        "pad_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
    }


README_TEMPLATE = """\
# kvgate-tiny

A small tokenizer with a real ChatML chat template, so kvgate's tests, demo and benchmarks run offline
with the same preprocessing path a real model takes (`transformers.AutoTokenizer.from_pretrained`,
`apply_chat_template`, `encode`). There are **no model weights**: `config.json` is a Llama-shaped config
that only tells servers the context length (`max_position_embeddings` = {max_pos}).

| file | what it holds |
|---|---|
| `tokenizer.json` | byte-level BPE, {vocab_size} tokens ({merges} merges), trained with `tokenizers` {tokenizers_version} |
| `tokenizer_config.json` | `PreTrainedTokenizerFast`, special tokens, `model_max_length` {max_pos}, the ChatML `chat_template` |
| `config.json` | Llama-shaped config (vocab size, `max_position_embeddings`), no weights anywhere |
| `generation_config.json` | stop tokens `<|im_end|>`, `<|endoftext|>` |

Special tokens: `<|endoftext|>` = 0 (pad), `<|im_start|>` = 1, `<|im_end|>` = 2 (eos). No BOS is added,
so `encode(text)` and `encode(text, add_special_tokens=False)` give the same ids, as with Qwen.

Pipeline: no normalizer (lossless: `decode(encode(text)) == text` for any text), the GPT-4o/Qwen2 split
regex, then byte-level mapping; single digits are split.

Chat template: ChatML as Qwen2.5 renders it without the default system prompt: `system` / `user` /
`assistant` / `tool` messages, content as a string or a list of `{{"type": "text", "text": ...}}` parts
(concatenated; any other part type raises), OpenAI `tools` and assistant `tool_calls` in Qwen's
`<tools>` / `<tool_call>` format, and `add_generation_prompt` appending `<|im_start|>assistant\\n`.

## How it was built

    python models/build_tiny_tokenizer.py            # rebuild in place
    python models/build_tiny_tokenizer.py --check    # rebuild in a temp dir and compare with these files

Training text, collected at build time from the Python that runs the script (here Python {python_version}):
the docstrings of every standard-library module, class and function (test suites, idlelib, lib2to3,
turtledemo excluded; read with `ast`, nothing imported), the full source of {source_modules} standard-library
modules, and a short multilingual sample written for this project. Corpus: {documents} documents,
{chars} characters, sha256 `{sha256}`. The same Python version gives the same corpus and the same files.

## Licence of the training text

The Python standard library's docstrings and source are covered by the PSF License Agreement
(https://docs.python.org/3/license.html), which permits use and derivative works. The multilingual
sample is the kvgate project's own text (Apache-2.0, like the rest of the project). The files in this
directory are released under Apache-2.0.
"""


def write_model_dir(out: pathlib.Path, vocab_size: int) -> Corpus:
    import tokenizers

    corpus = collect_corpus(stdlib_root())
    tokenizer = train_tokenizer(corpus, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    actual_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    merges = len(json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"])
    files = {
        "tokenizer_config.json": tokenizer_config(),
        "config.json": model_config(actual_vocab),
        "generation_config.json": generation_config(),
    }
    for name, payload in files.items():
        (out / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    readme = README_TEMPLATE.format(
        max_pos=MAX_POSITION_EMBEDDINGS,
        vocab_size=actual_vocab,
        merges=merges,
        tokenizers_version=tokenizers.__version__,
        python_version=platform.python_version(),
        source_modules=len(SOURCE_MODULES),
        documents=len(corpus.documents),
        chars=corpus.chars,
        sha256=corpus.sha256,
    )
    (out / "README.md").write_text(readme, encoding="utf-8")
    return corpus


MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "README.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary incl. special tokens")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if not args.check:
        corpus = write_model_dir(args.out, args.vocab_size)
        print(f"wrote {args.out} (corpus {corpus.chars} chars, sha256 {corpus.sha256[:16]})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_model_dir(pathlib.Path(tmp), args.vocab_size)
        differing = [
            name for name in MODEL_FILES if not filecmp.cmp(args.out / name, pathlib.Path(tmp) / name, shallow=False)
        ]
    if differing:
        print(f"rebuild differs from {args.out}: {', '.join(differing)}", file=sys.stderr)
        return 1
    print(f"rebuild matches {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
