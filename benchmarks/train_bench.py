"""LoRA fine-tuning speed and memory: gptoss-jax (experts packed MXFP4, frozen) against HF
transformers + PEFT (experts dequantized to bf16, as the OpenAI cookbook's recipe runs it), on
random weights at a real shape, on one accelerator.

    python benchmarks/train_bench.py --impl jax --json jax.json     # gptoss_jax.train.Trainer
    python benchmarks/train_bench.py --impl hf --json hf.json       # GptOssForCausalLM + peft
    python benchmarks/train_bench.py --impl jax --method full       # every non-expert parameter

Both train the same adapters: LoRA rank 8 (alpha 16) on the attention projections q, k, v, o and
on both expert projections of the layers given by --expert-layers (the cookbook: 7, 15, 23),
AdamW, gradient checkpointing per block, bf16 compute, every token of each row a loss token.
HF runs `attn_implementation="eager"` (the sinks need it without downloaded kernels). A step is
forward + backward + optimizer update on --batch rows of --seq-len tokens; the first --warmup
steps (compilation) are not timed. Peak memory is the device's peak bytes in use.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gptoss_jax.config import PRESETS, GptOssConfig  # noqa: E402


def random_rows(config: GptOssConfig, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)


def run_jax(config: GptOssConfig, args) -> dict:
    import jax
    import jax.numpy as jnp

    from gptoss_jax import train
    from gptoss_jax.dataset import batch_from_rows
    from gptoss_jax.loader import random_model

    model = random_model(config, dtype=jnp.bfloat16, seed=0)
    if args.method == "lora":
        lora = train.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=("q", "k", "v", "o", "mlp1", "mlp2"),
                                expert_layers=tuple(args.expert_layers))
        model = train.add_lora(model, lora)
    trainer = train.Trainer(model, args.method, train.OptimizerConfig(learning_rate=2e-4, steps=1000))
    rows = random_rows(config, args.batch, args.seq_len)
    positions = np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), (args.batch, args.seq_len)).copy()
    batch = batch_from_rows(rows[:, :-1], positions, rows[:, 1:], np.ones((args.batch, args.seq_len), np.float32))
    losses, times = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(trainer.step(batch)["loss"])  # float(): waits for the step
        times.append(time.perf_counter() - start)
    trainable = sum(int(np.prod(v.shape)) for v in trainer.state["params"].values())
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"losses": losses, "step_seconds": times[args.warmup:], "trainable_parameters": trainable,
            "peak_device_bytes": stats.get("peak_bytes_in_use"), "device": jax.devices()[0].device_kind,
            "versions": {"jax": jax.__version__}}


def run_hf(config: GptOssConfig, args) -> dict:
    import peft
    import torch
    import transformers

    hf = dict(config.to_hf_dict())
    hf.pop("quantization_config", None)
    hf_config = transformers.GptOssConfig(**hf)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try the script
    cuda = device == "cuda"
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (fp32 first would not fit 20b's experts)
    with torch.device(device):
        model = transformers.GptOssForCausalLM(hf_config)  # random init, bf16 experts
    torch.set_default_dtype(torch.float32)
    model.config.attn_implementation = "eager"
    model.config._attn_implementation = "eager"
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                           target_parameters=[f"{layer}.mlp.experts.{name}" for layer in args.expert_layers
                                              for name in ("gate_up_proj", "down_proj")])
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    tokens = torch.from_numpy(random_rows(config, args.batch, args.seq_len)).long().to(device)
    losses, times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"losses": losses, "step_seconds": times[args.warmup:],
            "trainable_parameters": sum(p.numel() for p in params),
            "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["jax", "hf"], required=True)
    parser.add_argument("--model", choices=PRESETS, default="gpt-oss-20b", help="random weights at this shape")
    parser.add_argument("--method", choices=["lora", "full"], default="lora",
                        help="full: every parameter but the frozen MXFP4 experts (--impl jax only)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--expert-layers", type=lambda s: [int(x) for x in s.split(",") if x], default="7,15,23")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    config = GptOssConfig.preset(args.model)
    args.expert_layers = [layer for layer in args.expert_layers if layer < config.num_hidden_layers] or [0]
    if args.method == "full" and args.impl != "jax":
        parser.error("--method full is measured for --impl jax only")
    result = (run_jax if args.impl == "jax" else run_hf)(config, args)
    step = float(np.median(result["step_seconds"]))
    result.update(impl=args.impl, method=args.method, model=args.model, batch=args.batch, seq_len=args.seq_len, rank=args.rank,
                  expert_layers=args.expert_layers, median_step_seconds=step,
                  tokens_per_second=args.batch * args.seq_len / step,
                  date=datetime.date.today().isoformat(), command=" ".join(["python", *sys.argv]))
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses",)}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
