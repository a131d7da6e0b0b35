#!/usr/bin/env bash
# Fine-tuning speed and memory on one GPU (benchmarks/train_bench.py), from the repository root
# on the device machine:  bash benchmarks/train_device.sh OUT_DIR [RUN ...]
# RUN is jax-lora-20b, hf-lora-20b, jax-full-20b or jax-lora-120b (default: the first three);
# each writes OUT_DIR/RUN.json and OUT_DIR/RUN.log and is stopped after $RUN_LIMIT s (default 300).
set -uo pipefail
out=$1; shift
runs=${*:-jax-lora-20b hf-lora-20b jax-full-20b}
source benchmarks/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/.whl  # openai_harmony (the chat format behind the data code)
mkdir -p "$out"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo no GPU) | tee "$out/device.txt"
for run in $runs; do
  IFS=- read -r impl method size <<< "$run"
  echo "== $run"
  timeout "${RUN_LIMIT:-300}" python3 benchmarks/train_bench.py --impl "$impl" --method "$method" \
    --model "gpt-oss-$size" --json "$out/$run.json" > "$out/$run.log" 2>&1
  echo "exit $?"; tail -n 25 "$out/$run.log"
done
