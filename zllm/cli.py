"""The `zllm` command: `zllm generate PROMPT...`, `zllm bench ...` (more verbs join as they are built)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from zllm.config import SECTIONS, EngineConfig, field_types


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per config key (block_size -> --block-size), all defaulting to 'unset'."""
    parser.add_argument("--config", help="a YAML config file; flags override its keys")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} config")
        for key, hint in field_types(cls).items():
            group.add_argument("--" + key.replace("_", "-"), dest=key, default=None,
                               metavar=key.upper(), help=f"({hint})".replace("typing.", ""))


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    keys = [k for cls in SECTIONS.values() for k in field_types(cls)]
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if args.config:
        return EngineConfig.from_yaml(args.config, **overrides)
    return EngineConfig.from_dict({}, **overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    from zllm.llm import LLM
    from zllm.sampling_params import SamplingParams

    llm = LLM.__new__(LLM)
    llm._init(config_from_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed)
    for out in llm.generate(args.prompts, params):
        print(f"--- prompt: {out.prompt!r}")
        for c in out.outputs:
            print(c.text)
            print(f"--- {len(c.token_ids)} tokens, finish_reason={c.finish_reason}")
    llm.shutdown()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from zllm.bench.throughput import run_bench

    keys = [k for cls in SECTIONS.values() for k in field_types(cls)]
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    run_bench(args, overrides)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="zllm", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    gen = verbs.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sample-seed", type=int, default=None, help="sampling seed")
    add_config_flags(gen)
    bench = verbs.add_parser("bench", help="throughput and latency against the roofline and a peer")
    from zllm.bench.throughput import add_bench_args

    add_bench_args(bench)
    add_config_flags(bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_bench(args) if args.verb == "bench" else cmd_generate(args)
    except ValueError as e:
        print(f"zllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
