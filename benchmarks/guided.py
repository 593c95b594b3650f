"""The throughput cost of guided decoding: a batch where every request has a JSON schema, against
the same batch unguided, on the built-in SmolLM2 (or any model directory).

The guided run goes first; the unguided run then makes exactly as many tokens per request
(max_tokens = the guided output's length, ignore_eos), so both runs have the same batch, the same
steps and the same tokens, and the difference is what guided decoding costs: the masks, the
grammar advancing, and the steps not overlapped. The two alternate, each repeated, and the best time of each is kept.

    .venv/bin/python benchmarks/guided.py --requests 32 --repeats 3 [--distinct-schemas] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date

from engine import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "interests": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "interests", "employed"],
    "additionalProperties": False,
}


def schema_for(i: int, distinct: bool) -> dict:
    if not distinct:
        return SCHEMA
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"]["age"]["maximum"] = 100 + i  # a different grammar per request
    return schema


def run(llm: LLM, prompts: list[list[dict]], params: list[SamplingParams]) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.chat(prompts, params)
    return time.perf_counter() - start, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--distinct-schemas", action="store_true", help="a different schema per request")
    ap.add_argument("--machine", default=platform.node())
    args = ap.parse_args()

    llm = LLM(args.model, device=args.device, max_num_seqs=max(args.requests, 1))
    prompts = [[{"role": "user", "content": f"Invent person number {i}: name, age, city, interests, "
                                            "whether employed. Answer in JSON."}] for i in range(args.requests)]
    guided = [SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=i,
                             response_format={"type": "json_schema", "json_schema": {
                                 "name": "person", "schema": schema_for(i, args.distinct_schemas)}})
              for i in range(args.requests)]
    # Warm-up at full size (the grammar tokenizer, first compiles, the batch's buffers); it also
    # gives each request's guided length, which the unguided runs then make exactly.
    _, outs = run(llm, prompts, guided)
    lengths = [len(o.token_ids) for o in outs]
    plain = [SamplingParams(max_tokens=n, temperature=0.7, seed=i, ignore_eos=True) for i, n in enumerate(lengths)]
    run(llm, prompts, plain)
    # Guided and unguided runs alternate, so that a change of the machine's load meets both.
    guided_times, plain_times = [], []
    for _ in range(args.repeats):
        took, outs = run(llm, prompts, guided)
        guided_times.append(took)
        assert [len(o.token_ids) for o in outs] == lengths  # seeded: the same tokens each time
        took, plain_outs = run(llm, prompts, plain)
        plain_times.append(took)
        assert [len(o.token_ids) for o in plain_outs] == lengths
    best_guided, best_plain = min(guided_times), min(plain_times)
    tokens = sum(lengths)
    result = {
        "date": date.today().isoformat(), "machine": args.machine, "device": args.device,
        "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "model": args.model,
        "requests": args.requests, "distinct_schemas": args.distinct_schemas, "tokens": tokens,
        "completed_by_grammar": sum(o.finish_reason == "stop" for o in outs),
        "unguided_tok_s": round(tokens / best_plain, 1), "guided_tok_s": round(tokens / best_guided, 1),
        "cost_pct": round(100 * (1 - best_plain / best_guided), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
