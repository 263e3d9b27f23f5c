#!/usr/bin/env sh
# One vLLM worker as kvgate expects it, plus its sidecar. Every flag is explained in
# configs/DEPLOY.md ("vLLM launch lines"). Usage:
#   TIER=gpu|cpu|lmcache MODEL=Qwen/Qwen2.5-7B-Instruct WORKER_ID=w0 \
#   ETCD=127.0.0.1:2379 NATS=nats://127.0.0.1:4222 sh configs/vllm/serve.sh
set -eu

MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
SERVED_NAME=${SERVED_NAME:-$MODEL}
WORKER_ID=${WORKER_ID:-$(hostname)}
PORT=${PORT:-8000}                       # the engine's OpenAI server
EVENTS_PORT=${EVENTS_PORT:-5557}         # ZMQ PUB (dp rank r binds EVENTS_PORT + r)
REPLAY_PORT=${REPLAY_PORT:-5558}         # ZMQ ROUTER replay (same +r rule)
SIDECAR_PORT=${SIDECAR_PORT:-9100}       # the sidecar's /health and /metrics
ADVERTISE_HOST=${ADVERTISE_HOST:-127.0.0.1}   # how gateways reach this host
TIER=${TIER:-cpu}
CPU_BYTES=${CPU_BYTES:-32000000000}      # CPU tier size for the OffloadingConnector (bytes)
SIDECAR_ARGS=${SIDECAR_ARGS:-}           # e.g. "--etcd-user kvgate --nats-user kvgate" (secrets: KVGATE_* env)

# Engine block hashes use Python's hash seed; fixing it makes them stable across restarts
# and identical across dp ranks (kvgate recomputes its own hashes from token ids either way).
export PYTHONHASHSEED=0

KV_EVENTS="{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\",
  \"endpoint\": \"tcp://*:${EVENTS_PORT}\", \"replay_endpoint\": \"tcp://*:${REPLAY_PORT}\",
  \"buffer_steps\": 10000, \"hwm\": 100000, \"topic\": \"\"}"

case "$TIER" in
  gpu)
    TRANSFER=""; TIERS=GPU ;;
  cpu)
    # vLLM's native CPU tier; it publishes medium=CPU events, so kvgate indexes the tier.
    # (vLLM 0.11-0.12 name the size "num_cpu_blocks": <blocks> instead of cpu_bytes_to_use.)
    TRANSFER="{\"kv_connector\": \"OffloadingConnector\", \"kv_role\": \"kv_both\",
      \"kv_connector_extra_config\": {\"block_size\": 64, \"cpu_bytes_to_use\": ${CPU_BYTES}}}"
    TIERS=GPU,CPU ;;
  lmcache)
    # LMCache keeps its CPU copies out of vLLM's KV-event stream: kvgate sees the GPU tier only.
    export LMCACHE_CHUNK_SIZE=256 LMCACHE_LOCAL_CPU=True LMCACHE_MAX_LOCAL_CPU_SIZE=${LMCACHE_CPU_GB:-20}
    TRANSFER='{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}'
    TIERS=GPU ;;
  *) echo "TIER must be gpu, cpu or lmcache" >&2; exit 2 ;;
esac

set -- vllm serve "$MODEL" --served-model-name "$SERVED_NAME" --host 0.0.0.0 --port "$PORT" \
  --block-size 64 --enable-prefix-caching --enable-prompt-tokens-details --kv-events-config "$KV_EVENTS"
if [ -n "$TRANSFER" ]; then set -- "$@" --kv-transfer-config "$TRANSFER"; fi
if [ "${DP_SIZE:-1}" -gt 1 ]; then set -- "$@" --data-parallel-size "$DP_SIZE"; fi
"$@" &
ENGINE=$!

python -m kvgate.worker.sidecar --worker-id "$WORKER_ID" --model "$SERVED_NAME" \
  --engine-url "http://127.0.0.1:${PORT}" --advertise-url "http://${ADVERTISE_HOST}:${PORT}" \
  --kv-events-endpoint "tcp://127.0.0.1:${EVENTS_PORT}" \
  --kv-events-replay-endpoint "tcp://127.0.0.1:${REPLAY_PORT}" \
  --etcd-endpoints "${ETCD:-127.0.0.1:2379}" --nats-url "${NATS:-nats://127.0.0.1:4222}" \
  --namespace "${NAMESPACE:-default}" --block-size 64 --dp-size "${DP_SIZE:-1}" --tiers "$TIERS" \
  --health-host 0.0.0.0 --health-port "$SIDECAR_PORT" $SIDECAR_ARGS &
SIDECAR=$!

# SIGTERM reaches the sidecar first, so it deregisters before the engine stops serving.
trap 'kill -TERM "$SIDECAR" 2>/dev/null; kill -TERM "$ENGINE" 2>/dev/null; wait' INT TERM EXIT
wait "$ENGINE"
