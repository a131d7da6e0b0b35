#!/usr/bin/env bash
# The server under load on one GPU, against `generate` at the same batch on the same card.
# From the repository root on the device machine (see benchmarks/device_env.sh), with the
# server's and the client's wheels for the machine's Python unpacked into .whl/:
#   bash benchmarks/serve_device.sh OUT_DIR [MODEL]
# Writes OUT_DIR/serve_load.json (benchmarks/serve_load.py at 1, 8, 32, 64 streams),
# OUT_DIR/generate.json (benchmarks/bench.py generate at batch 1 and 64) and the server's log.
set -euo pipefail
out=$1; model=${2:-gpt-oss-20b}
source benchmarks/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/.whl
mkdir -p "$out"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo no GPU) | tee "$out/device.txt"
python3 -m gptoss_jax.serve --checkpoint "$model" --kernels auto --slots 64 --max-context 1024 \
  --port 8000 --log-level warning > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=2)" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$out/server.log"; exit 1; }
  sleep 1
done
echo "server up after $SECONDS s"
python3 benchmarks/serve_load.py --model "$model" --concurrency 1 8 32 64 --requests-per-stream 4 \
  --prompt-words 64 --max-tokens 256 --output "$out/serve_load.json"
kill $server; wait $server 2>/dev/null || true
trap - EXIT
python3 benchmarks/bench.py --model "$model" --kernels fastest --measure generate,generate_batch \
  --generate-prompts 128 --batches 64 --batch-context 128 --generate-tokens 256 --json "$out/generate.json"
