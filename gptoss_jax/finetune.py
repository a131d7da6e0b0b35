"""`python -m gptoss_jax.finetune`: fine-tune gpt-oss on JSONL conversations (LoRA or full),
resumable, with the experts left in MXFP4; writes the adapters and/or a merged checkpoint.

    python -m gptoss_jax.finetune --checkpoint openai/gpt-oss-20b --data train.jsonl --output runs/lora \\
        --lora-rank 8 --steps 500 --batch-size 8 --seq-len 2048 --learning-rate 2e-4 --merge

docs/finetuning.md describes the data format, the options and the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import jax
from tqdm import tqdm

from gptoss_jax import train
from gptoss_jax.cli import add_model_arguments, cli
from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.converters.orbax_io import save_model
from gptoss_jax.dataset import Batches, read_dataset
from gptoss_jax.hub import resolve_checkpoint
from gptoss_jax.loader import load, parse_dtype, random_model
from gptoss_jax.sharding.mesh import make_mesh, parse_mesh_spec

CHECKPOINTS, METRICS, ADAPTERS, MERGED, QUANTIZATION = (
    "checkpoints", "metrics.jsonl", "adapters.safetensors", "merged", "quantization.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.finetune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune gpt-oss on JSONL conversations with the experts kept in MXFP4 (LoRA or full "
                    "fine-tuning; resumes from OUTPUT/checkpoints when run again with the same settings).")
    add_model_arguments(parser)
    for action in parser._actions:  # the shared model arguments, as training reads them
        if action.dest == "checkpoint":
            action.help = ("the model to fine-tune: a checkpoint directory (either MXFP4 layout, or converted) or a "
                           "Hugging Face repo id such as openai/gpt-oss-20b")
        elif action.dest == "kernels":
            action.help = "kernels for the model written at the end; training itself runs the XLA path"
    parser.add_argument("--from-scratch", metavar="CONFIG",
                        help="instead of --checkpoint: random initial weights of this architecture (a preset name: "
                             f"{', '.join(PRESETS)}, or a config.json), trained in full (--method full, the experts "
                             "through deltas re-quantized to MXFP4 at the end)")
    parser.add_argument("--data", required=True, help="training conversations, one JSON object per line")
    parser.add_argument("--eval-data", help="held-out conversations; their mean loss is logged every --eval-every "
                                            "steps and at the end")
    parser.add_argument("--output", required=True, help="folder for checkpoints, metrics.jsonl and the results")
    method = parser.add_argument_group("what trains")
    method.add_argument("--method", choices=train.METHODS, default="lora",
                        help="lora: low-rank adapters, the model frozen; full: every bf16 parameter (attention, "
                             "norms, router, embeddings, expert biases), the FP4 experts frozen")
    method.add_argument("--lora-rank", type=int, default=8)
    method.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    method.add_argument("--lora-dropout", type=float, default=0.0)
    method.add_argument("--lora-targets", default="q,k,v,o",
                        help=f"comma-separated, among {','.join(train.TARGETS)} (mlp1, mlp2: one low-rank pair per "
                             "expert on top of its FP4 weights)")
    method.add_argument("--lora-expert-layers", help="comma-separated layers whose experts get adapters (default all)")
    method.add_argument("--adapters", help="start from the adapters in this file (written by an earlier run)")
    method.add_argument("--train-experts", action="store_true",
                        help="with --method full: train the experts too, as fp32 deltas re-quantized to MXFP4 at the "
                             "end (12 bytes per expert weight)")
    method.add_argument("--qat-steps", type=int, default=0,
                        help="the last N optimizer steps train the expert adapters quantization-aware (forward "
                             "through the MXFP4 rounding the export applies, straight-through gradient)")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--steps", type=int, help="optimizer steps (default: one pass over --data, or --epochs)")
    opt.add_argument("--epochs", type=float, help="passes over --data (instead of --steps)")
    opt.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    opt.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    opt.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    opt.add_argument("--learning-rate", type=float, default=1e-4)
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--final-learning-rate-ratio", type=float, default=0.1,
                     help="the cosine decay ends at this fraction of --learning-rate")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    opt.add_argument("--no-remat", action="store_true", help="keep every block's activations (faster, more memory)")
    data = parser.add_argument_group("data")
    data.add_argument("--no-packing", action="store_true",
                      help="one conversation per row, padded (default: packed, each attending only to itself)")
    data.add_argument("--keep-analysis", action="store_true",
                      help="keep (and train on) the analysis of earlier turns (default: dropped, as at inference)")
    data.add_argument("--skip-bad-records", action="store_true",
                      help="skip and count bad records instead of stopping at the first")
    run = parser.add_argument_group("run")
    run.add_argument("--save-every", type=int, default=100, help="optimizer steps between checkpoints")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--eval-every", type=int, default=100, help="optimizer steps between evaluations")
    run.add_argument("--merge", action="store_true",
                     help="also write OUTPUT/merged: the adapters merged into a full checkpoint, adapted experts "
                          "re-quantized to MXFP4 (convert it with python -m gptoss_jax.convert --to hf)")
    run.add_argument("--seed", type=int, default=0, help="data order, adapter initialisation, dropout")
    run.add_argument("--no-progress", action="store_true")
    return parser


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _check_arguments(args) -> None:
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 2),
                             ("--grad-accum", args.grad_accum, 1), ("--save-every", args.save_every, 1),
                             ("--keep-checkpoints", args.keep_checkpoints, 1), ("--eval-every", args.eval_every, 1),
                             ("--qat-steps", args.qat_steps, 0)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if (args.checkpoint is None) == (args.from_scratch is None):
        raise ValueError("give the model to fine-tune with --checkpoint, or --from-scratch CONFIG to train a new one")
    if args.from_scratch is not None:
        if args.method != "full":
            raise ValueError("--from-scratch trains every weight: use --method full")
        args.train_experts = True
    if args.train_experts and args.method != "full":
        raise ValueError("--train-experts is for --method full; LoRA adapts the experts with --lora-targets mlp1,mlp2")
    if args.adapters and args.method != "lora":
        raise ValueError("--adapters starts LoRA training from saved adapters: use --method lora")


def _load_model(args):
    mesh = make_mesh(parse_mesh_spec(args.mesh)) if args.mesh else None
    if args.from_scratch is not None:
        name = args.from_scratch
        config = GptOssConfig.preset(name) if name in PRESETS and not Path(name).exists() else \
            GptOssConfig.from_json(name)
        return random_model(config, mesh=mesh, dtype=parse_dtype(args.dtype), seed=args.seed)
    if args.checkpoint in PRESETS and not Path(args.checkpoint).exists():
        print(f"note: --checkpoint {args.checkpoint} is a preset: random weights at its shape", file=sys.stderr)
        return random_model(GptOssConfig.preset(args.checkpoint), mesh=mesh, dtype=parse_dtype(args.dtype), seed=args.seed)
    path = resolve_checkpoint(args.checkpoint, log=lambda message: print(message, file=sys.stderr))
    return load(path, dtype=args.dtype, mesh=mesh, kernels=args.kernels)


def _settings(args, data_sha256: str, lora: train.LoraConfig | None, optimizer: train.OptimizerConfig) -> dict:
    """What decides the training trajectory; a resumed run must have the same (as JSON)."""
    return json.loads(json.dumps({"data_sha256": data_sha256, "checkpoint": args.checkpoint, "from_scratch": args.from_scratch,
            "dtype": args.dtype, "method": args.method, "lora": lora.to_dict() if lora else None,
            "adapters": args.adapters, "train_experts": args.train_experts, "qat_steps": args.qat_steps,
            "optimizer": {k: v for k, v in optimizer.__dict__.items()}, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "packing": not args.no_packing, "keep_analysis": args.keep_analysis,
            "skip_bad_records": args.skip_bad_records, "seed": args.seed, "remat": not args.no_remat}))


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} then, {b!r} now)")
    return out


def _is_main() -> bool:
    return jax.process_index() == 0


def run(args) -> int:
    _check_arguments(args)
    output = Path(args.output)
    lora = None
    if args.method == "lora" and not args.adapters:
        lora = train.LoraConfig(args.lora_rank, args.lora_alpha, args.lora_dropout,
                                tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                                _int_list(args.lora_expert_layers, "--lora-expert-layers"))
        lora.check()
    data_path = Path(args.data)
    dataset = read_dataset(data_path, max_length=args.seq_len, keep_analysis=args.keep_analysis,
                           skip_bad_records=args.skip_bad_records)
    for line, reason in dataset.skipped[:5]:
        print(f"note: skipped {data_path}:{line}: {reason}", file=sys.stderr)
    if dataset.skipped:
        print(f"note: skipped {len(dataset.skipped)} bad record(s) of {len(dataset.skipped) + len(dataset.examples)} "
              f"in {data_path}", file=sys.stderr)
    eval_batches = None
    if args.eval_data:
        eval_set = read_dataset(args.eval_data, max_length=args.seq_len, keep_analysis=args.keep_analysis,
                                skip_bad_records=args.skip_bad_records)
        eval_batches = Batches(eval_set, batch_size=args.batch_size, seq_len=args.seq_len,
                               packing=not args.no_packing, shuffle=False).one_epoch()
    batches = Batches(dataset, batch_size=args.batch_size, seq_len=args.seq_len, packing=not args.no_packing,
                      seed=args.seed)
    steps = args.steps
    if steps is None:
        steps = max(1, math.ceil((args.epochs or 1.0) * batches.batches_in_epoch(0) / args.grad_accum))
    optimizer = train.OptimizerConfig(args.learning_rate, steps, args.warmup_steps, args.final_learning_rate_ratio,
                                      args.weight_decay, args.max_grad_norm, args.grad_accum)
    optimizer.check()
    if args.qat_steps > steps:
        raise ValueError(f"--qat-steps ({args.qat_steps}) must be at most the optimizer steps ({steps})")

    settings = _settings(args, hashlib.sha256(data_path.read_bytes()).hexdigest(), lora, optimizer)
    checkpoints, start = None, None
    if (output / CHECKPOINTS).is_dir():
        checkpoints = train.Checkpoints(output / CHECKPOINTS, keep=args.keep_checkpoints)
        start = checkpoints.latest()
    if start is not None:
        different = _differences(checkpoints.progress(start)["settings"], settings)
        if different:
            raise ValueError(f"{output}: its checkpoints were written with other settings: {'; '.join(different)}; "
                             f"use another --output, or the same settings to resume")

    model = _load_model(args)
    if args.adapters:
        lora = train.load_adapters(model, args.adapters)
    elif args.method == "lora":
        train.add_lora(model, lora, seed=args.seed)
    elif args.train_experts:
        train.add_expert_deltas(model)
    if args.qat_steps and not any(t in ("mlp1", "mlp2") for _, t, _ in train.adapter_modules(model)):
        raise ValueError("--qat-steps needs trained experts: --lora-targets with mlp1/mlp2, or --train-experts")
    trainer = train.Trainer(model, args.method, optimizer, seed=args.seed, remat=not args.no_remat)
    del model

    checkpoints = checkpoints or train.Checkpoints(output / CHECKPOINTS, keep=args.keep_checkpoints)
    total = steps * args.grad_accum
    qat_from = (steps - args.qat_steps) * args.grad_accum
    if start is not None:
        if start >= qat_from and args.qat_steps:
            trainer.quantization_aware(True)
        trainer.state = checkpoints.restore(start, trainer.abstract_state())
        print(f"note: resuming from {output / CHECKPOINTS} at batch {start} of {total}", file=sys.stderr)
    metrics = train.MetricsLog(output / METRICS, resume_step=start) if _is_main() else None

    def log(record):
        if metrics is not None:
            metrics.write(record)

    def evaluate(batch_index):
        if eval_batches is not None:
            value = trainer.eval_loss(eval_batches)
            log({"step": batch_index, "eval_loss": value})
            return value
        return None

    def save(batch_index):
        checkpoints.save(batch_index, trainer.state, {"batches": batch_index, "settings": settings})

    bar = tqdm(total=total, initial=trainer.steps_done, unit="batch", dynamic_ncols=True,
               disable=args.no_progress or not _is_main(), file=sys.stderr)
    try:
        while trainer.steps_done < total:
            index = trainer.steps_done
            if index == qat_from and args.qat_steps:
                trainer.quantization_aware(True)
            batch = batches[index]
            began = time.perf_counter()
            result = trainer.step(batch)
            seconds = time.perf_counter() - began
            tokens = int((batch.positions >= 0).sum())
            memory, where = train.peak_memory()
            record = {"step": index + 1, "optimizer_step": (index + 1) // args.grad_accum,
                      "epoch": batches.locate(index)[0], **result, "tokens": tokens,
                      "tokens_per_s": tokens / seconds, "seconds": seconds, f"peak_{where}_memory_bytes": memory}
            log(record)
            bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{tokens / seconds:.0f}",
                            mem=f"{memory / 2**30:.2f}G", refresh=False)
            bar.update(1)
            done = index + 1
            if done % args.grad_accum == 0:
                optimizer_step = done // args.grad_accum
                if eval_batches is not None and optimizer_step % args.eval_every == 0 and done < total:
                    bar.write(f"step {optimizer_step}: eval loss {evaluate(done):.4f}", file=sys.stderr)
                if optimizer_step % args.save_every == 0 or done == total:
                    save(done)
        if checkpoints.latest() != total:
            save(total)
    finally:
        bar.close()
        checkpoints.close()
    final_eval = evaluate(total)
    if final_eval is not None:
        print(f"eval loss {final_eval:.4f}", file=sys.stderr)
    _export(args, trainer, lora, output)
    return 0


def _export(args, trainer: train.Trainer, lora, output: Path) -> None:
    model = trainer.model()
    if args.method == "lora" and _is_main():
        train.save_adapters(model, output / ADAPTERS, lora)
        print(f"wrote {output / ADAPTERS}")
    if args.method == "lora" and not args.merge:
        return
    merged, report = train.merge_adapters(model) if train.has_adapters(model) else (model, [])
    save_model(merged, output / MERGED, force=True)
    if _is_main():
        (output / QUANTIZATION).write_text(json.dumps([r.__dict__ for r in report], indent=1))
        if report:
            worst = max(report, key=lambda r: r.relative_error)
            print(f"re-quantized {len(report)} adapted expert tensors to MXFP4: largest relative error "
                  f"{worst.relative_error:.2e} ({worst.tensor}); per tensor in {output / QUANTIZATION}")
        print(f"wrote {output / MERGED} (to HF safetensors: python -m gptoss_jax.convert {output / MERGED} DST --to hf)")


def main(argv=None) -> int:
    return cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
