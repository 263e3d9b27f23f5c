#!/usr/bin/env python
"""Build a tiny, deterministic Llama that a real vLLM serves over kvgate's test tokenizer.

    python models/build_tiny_llama.py models/kvgate-tiny OUT_DIR [--seed 0] [--check]

Runs in the vLLM virtualenv (it has torch and transformers; ``make vllm`` calls it).
TOKENIZER_DIR holds tokenizer.json, tokenizer_config.json (ChatML chat template) and
config.json. The model: LlamaForCausalLM, hidden 256, 4 heads of head_dim 64 (vLLM's CPU
attention rejects head_dim 16), 2 KV heads, 2 layers, intermediate 512, the tokenizer's
vocabulary, 8,192 positions, tied embeddings, bf16: about 3.3M parameters, 6.6 MB.

Its weights are random and it writes nonsense; what the tests need is a real engine with
a real KV cache, real prefix caching and real KV events. The weights are not transformers'
own init (which changes between versions): every tensor is filled in sorted-name order
from one generator seeded with ``--seed`` (normal(0, 0.02), norms 1), so model.safetensors
is byte-identical across runs under one transformers version (``--check`` builds twice and
compares).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vocab_size_of(tok_dir: Path) -> int:
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = set(tok["model"]["vocab"].values())
    ids.update(t["id"] for t in tok.get("added_tokens", []))
    return max(ids) + 1


def build(tok_dir: Path, out_dir: Path, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src_cfg = json.loads((tok_dir / "config.json").read_text()) if (tok_dir / "config.json").exists() else {}
    vocab = vocab_size_of(tok_dir)
    if src_cfg.get("vocab_size", vocab) != vocab:
        print(
            f"warning: config.json vocab_size {src_cfg['vocab_size']} != tokenizer {vocab}; using {vocab}",
            file=sys.stderr,
        )
    tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    gen_cfg_path = tok_dir / "generation_config.json"
    gen_cfg = json.loads(gen_cfg_path.read_text()) if gen_cfg_path.exists() else {}

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=src_cfg.get("rms_norm_eps", 1e-6),
        rope_theta=src_cfg.get("rope_theta", 1_000_000.0),
        tie_word_embeddings=True,
        bos_token_id=src_cfg.get("bos_token_id", 0),
        eos_token_id=src_cfg.get("eos_token_id", 2),
        pad_token_id=gen_cfg.get("pad_token_id", 0),
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sd = model.state_dict()
        for name in sorted(sd):
            t = sd[name]
            if name.endswith("norm.weight"):
                t.copy_(torch.ones_like(t))
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.02)
    model = model.to(torch.bfloat16).eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # generation config: stop tokens from the tokenizer dir (im_end, endoftext)
    if gen_cfg:
        (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copyfile(tok_dir / name, out_dir / name)
    # chat template also as a standalone file (newer transformers/vLLM prefer chat_template.jinja)
    if "chat_template" in tok_cfg and not (out_dir / "chat_template.jinja").exists():
        (out_dir / "chat_template.jinja").write_text(tok_cfg["chat_template"])
    n_params = sum(p.numel() for p in model.parameters())
    return {"params": n_params, "vocab": vocab, "sha256_model": sha256(out_dir / "model.safetensors")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="also build in a temp dir and compare sha256")
    a = ap.parse_args()
    t0 = time.perf_counter()
    info = build(a.tokenizer_dir, a.out_dir, a.seed)
    info["build_s"] = round(time.perf_counter() - t0, 2)
    if a.check:
        with tempfile.TemporaryDirectory() as td:
            info2 = build(a.tokenizer_dir, Path(td), a.seed)
            diff = [
                f.name
                for f in sorted(a.out_dir.iterdir())
                if f.is_file() and (Path(td) / f.name).exists() and sha256(f) != sha256(Path(td) / f.name)
            ]
        info["deterministic"] = info2["sha256_model"] == info["sha256_model"] and not diff
        info["differing_files"] = diff
    print(json.dumps(info, indent=2))
    return 0 if info.get("deterministic", True) else 1


if __name__ == "__main__":
    sys.exit(main())
