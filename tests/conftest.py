"""Suite-wide settings: everything runs offline, on loopback, from this checkout."""

import os

# Tokenizers come from the checkout (models/kvgate-tiny); never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real etcd and nats-server fixtures (etcd_server, nats_server), and real vLLM engines
# (vllm_engines), for every test module.
pytest_plugins = ("tests.servers", "tests.vllm_engines")
