#!/bin/sh
# NVIDIA Dynamo 1.6.1 in its own virtualenv, for `python -m kvgate.loadtest.dynamo`
# (kvgate beside Dynamo). Not part of `make test`; nothing in the test suite needs it.
#
#   dev/dynamo_install.sh [VENV_ROOT]     (default .venv; `make dynamo` runs it)
#
# - ai-dynamo-runtime 1.6.1 installs normally; ai-dynamo 1.6.1 with --no-deps, because it
#   pins aisimulate, which downloads from outside PyPI (the mocker runs without it), then
#   the rest of its Requires-Dist by hand (no torch: the mocker and frontend need none);
# - the model directory the two front ends share: DeepSeek V3's 128k tokenizer.json
#   (MIT, shipped inside the litellm wheel) in VENV_ROOT/dynamo-model; the bench writes
#   tokenizer_config.json (its chat template), config.json and generation_config.json.
set -eu
PYTHON=${PYTHON:-python3}
ROOT=${1:-.venv}
VENV="$ROOT/dynamo"
DL="$ROOT/dynamo-dl"
MODEL="$ROOT/dynamo-model"

mkdir -p "$DL" "$MODEL"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip download -q --no-deps -d "$DL" ai-dynamo-runtime==1.6.1 ai-dynamo==1.6.1
"$VENV/bin/python" -m pip install -q "$DL"/ai_dynamo_runtime-1.6.1-*.whl
"$VENV/bin/python" -m pip install -q --no-deps "$DL"/ai_dynamo-1.6.1-py3-none-any.whl
"$VENV/bin/python" -m pip install -q \
    'aiohttp>=3.14.3,<4.0' 'certifi>=2026.10.19' 'kubernetes>=32.0.1,<33.0.0' 'msgspec>=0.19.0' \
    'prometheus-client>=0.23.1,<1.0' 'pyzmq>=26.0.0' 'redis>=6.2.0,<9.0.0' 'tqdm>=4.0.0' \
    'transformers>=4.56.0' 'typing-extensions>=4.10.0' 'zstandard>=0.23.0,<1.0'

if [ ! -f "$MODEL/tokenizer.json" ]; then
    if ! ls "$DL"/litellm-*.whl >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip download -q --no-deps -d "$DL" litellm
    fi
    WHEEL=$(ls "$DL"/litellm-*.whl | head -n 1)
    "$VENV/bin/python" - "$WHEEL" "$MODEL" <<'PY'
import sys, zipfile
from pathlib import Path

wheel, model = sys.argv[1], Path(sys.argv[2])
inside = "litellm/litellm_core_utils/tokenizers/"
with zipfile.ZipFile(wheel) as z:
    (model / "tokenizer.json").write_bytes(z.read(inside + "deepseek_tokenizer.json"))
    (model / "LICENSE").write_bytes(z.read(inside + "deepseek_tokenizer_LICENSE"))
PY
fi
"$VENV/bin/python" -c "import dynamo.frontend, dynamo.mocker" && echo "Dynamo 1.6.1 ready in $VENV; tokenizer in $MODEL"
