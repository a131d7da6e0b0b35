"""Load test of a running OpenAI-compatible server (`python -m gptoss_jax.serve`, or any other):
N concurrent streamed chat completions through the official `openai` client, per level of N.

Per level it records requests/s, output tokens/s, time to first token (TTFT), inter-token
latency (ITL: the gap between two deliveries divided by the tokens the later one brought),
time per output token after the first (TPOT) and end-to-end latency as percentiles, plus the
server's Prometheus /metrics after the level, and writes everything to one JSON file.

    python -m gptoss_jax.serve --checkpoint ... --slots 64 &
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000/v1 --concurrency 1 8 32 64 \\
        --max-tokens 256 --output serve_load.json

Tokens are timed by the `token_ids` each chunk carries (`return_token_ids`, as gptoss_jax.serve
and vLLM offer): a harmony header brings tokens but no text. `--no-token-ids` times text
deltas instead, for servers without the extension. Every request asks for exactly
--max-tokens; one that stops earlier (a model that answers) counts what it generated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import httpx
import openai

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
         "but not what all were we when your can said there use an each which she do how their if will up other about "
         "out many then them these so some her would make like him into time has look two more write go see number no "
         "way could people my than first water been call who oil its now find long down day did get come made may part")


def prompt_text(words: int, rng: random.Random) -> str:
    vocabulary = WORDS.split()
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"mean": statistics.fmean(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "max": ordered[-1], "count": len(ordered)}


async def one_stream(client: openai.AsyncOpenAI, args, prompt: str) -> dict:
    extra = {"return_token_ids": True} if args.token_ids else {}
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
        temperature=args.temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra)
    arrivals = []  # (time, tokens) of each chunk that brought tokens
    usage = None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if args.token_ids:
            count = len(choice.model_extra.get("token_ids") or [])
        else:
            delta = choice.delta
            count = int(bool(delta.content or (delta.model_extra or {}).get("reasoning_content")))
        if count:
            arrivals.append((now, count))
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else sum(n for _, n in arrivals)
    gaps = []
    for (before, _), (after, count) in zip(arrivals, arrivals[1:]):
        gaps += [(after - before) / count] * count
    first = arrivals[0][0] if arrivals else None
    return {"ttft": None if first is None else first - start, "itl": gaps, "e2e": end - start,
            "tpot": (end - first) / (tokens - 1) if first is not None and tokens > 1 else None,
            "output_tokens": tokens, "prompt_tokens": usage.prompt_tokens if usage is not None else None}


async def level(client: openai.AsyncOpenAI, args, concurrency: int, rng: random.Random) -> dict:
    total = args.requests or args.requests_per_stream * concurrency
    prompts = [prompt_text(args.prompt_words, rng) for _ in range(total)]
    queue = list(prompts)
    results, failures = [], []

    async def worker():
        while queue:
            prompt = queue.pop()
            try:
                results.append(await asyncio.wait_for(one_stream(client, args, prompt), args.timeout))
            except Exception as error:  # recorded, not fatal: a load test reports what failed
                failures.append(f"{type(error).__name__}: {error}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    output_tokens = sum(r["output_tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": total, "completed": len(results), "failed": len(failures),
        "failures": failures[:10], "wall_s": wall, "requests_per_s": len(results) / wall,
        "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / wall,
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in results),
        "ttft_s": percentiles([r["ttft"] for r in results if r["ttft"] is not None]),
        "itl_s": percentiles([gap for r in results for gap in r["itl"]]),
        "tpot_s": percentiles([r["tpot"] for r in results if r["tpot"] is not None]),
        "e2e_s": percentiles([r["e2e"] for r in results]),
    }


def server_metrics(args) -> dict | None:
    """The server's /metrics (next to /v1) as {sample: value}; None if it has none."""
    url = args.metrics_url or args.base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        reply = httpx.get(url, timeout=30)
        reply.raise_for_status()
    except httpx.HTTPError:
        return None
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return {"text": reply.text}
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def run(args) -> dict:
    rng = random.Random(args.seed)
    async with openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                                  timeout=args.timeout, http_client=httpx.AsyncClient(
                                      limits=httpx.Limits(max_connections=max(args.concurrency) + 8),
                                      timeout=args.timeout)) as client:
        for _ in range(args.warmup):  # compiles the server's shapes before anything is timed
            await one_stream(client, args, prompt_text(args.prompt_words, rng))
        levels = []
        for concurrency in args.concurrency:
            result = await level(client, args, concurrency, rng)
            result["server_metrics"] = server_metrics(args)
            levels.append(result)
            print(f"{concurrency:>5} streams: {result['requests_per_s']:8.2f} req/s  {result['output_tokens_per_s']:9.1f} "
                  f"tok/s  TTFT p50 {result['ttft_s'].get('p50', float('nan')):.3f}s p99 "
                  f"{result['ttft_s'].get('p99', float('nan')):.3f}s  ITL p50 {result['itl_s'].get('p50', float('nan')):.4f}s "
                  f"p99 {result['itl_s'].get('p99', float('nan')):.4f}s  failed {result['failed']}", file=sys.stderr)
    settings = {k: v for k, v in vars(args).items() if k not in ("api_key", "output")}
    return {"settings": settings, "levels": levels}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--metrics-url", help="default: /metrics next to --base-url")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="tiny", help="the served model name")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="levels of concurrent streams")
    parser.add_argument("--requests", type=int, help="requests per level (default: --requests-per-stream x N)")
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=64, help="words of each (random) user message")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-token-ids", dest="token_ids", action="store_false",
                        help="time text deltas, for servers without the return_token_ids extension")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="JSON file for the results (default: stdout)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.concurrency) < 1 or args.max_tokens < 1:
        print("error: --concurrency and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=1)
    if args.output:
        with open(args.output, "w") as file:
            file.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
