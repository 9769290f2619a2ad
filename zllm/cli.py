"""The `zllm` command: `zllm generate PROMPT...`, `zllm serve CONFIG.yaml`, `zllm bench NAME ...`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from typing import Any, Optional

from zllm.config import (OFFLINE_DEFAULTS_HELP, SECTIONS, EngineConfig, field_types,
                         offline_config)

# `zllm bench NAME ARGS...` runs the main(argv) of these modules.
BENCHMARKS = {
    "control-path": "zllm.bench.control_path",
    "recovery": "zllm.bench.recovery",
    "scheduling": "zllm.bench.scheduling",
    "serve": "zllm.bench.serve",
    "structured": "zllm.bench.structured",
    "throughput": "zllm.bench.throughput",
}


def add_config_flags(parser: argparse.ArgumentParser, offline: bool = False) -> None:
    """One --flag per config key (block_size -> --block-size), all defaulting to 'unset'. With
    `offline`, the help names the defaults that offline_config changes."""
    parser.add_argument("--config", help="a YAML config file; flags override its keys")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} config", (cls.__doc__ or "").strip())
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else None
                    for f in dataclasses.fields(cls)}
        for key, hint in field_types(cls).items():
            kind = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            group.add_argument("--" + key.replace("_", "-"), dest=key, default=None,
                               metavar=key.upper(), help=f"{kind}, default {defaults[key]!r}"
                               + (f" ({OFFLINE_DEFAULTS_HELP[key]})"
                                  if offline and key in OFFLINE_DEFAULTS_HELP else ""))


def config_keys() -> list[str]:
    return [k for cls in SECTIONS.values() for k in field_types(cls)]


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given on the command line."""
    return {k: getattr(args, k) for k in config_keys() if getattr(args, k, None) is not None}


def config_from_args(args: argparse.Namespace,
                     defaults: Optional[dict[str, Any]] = None) -> EngineConfig:
    """The config file's keys (if any), then the flags', over `defaults`."""
    overrides = config_overrides(args)
    if args.config:
        return EngineConfig.from_yaml(args.config, defaults, **overrides)
    return EngineConfig.from_dict({}, defaults, **overrides)


def generate_config(args: argparse.Namespace) -> EngineConfig:
    """`zllm generate`'s config: the offline defaults where nothing sets them (offline_config)."""
    return offline_config(lambda defaults: config_from_args(args, defaults))


def cmd_generate(args: argparse.Namespace) -> int:
    """Each prompt as a user turn of a chat when the tokenizer has a chat template (an instruct
    model, like the default), else as plain text; --raw always sends plain text."""
    from zllm.llm import LLM
    from zllm.sampling_params import SamplingParams

    llm = LLM(engine_config=generate_config(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed)
    chat = not args.raw and bool(getattr(llm.tokenizer, "chat_template", None))
    if chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params,
                           use_tqdm=False)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for prompt, out in zip(args.prompts, outputs):
        print(f"--- {'user' if chat else 'prompt'}: {prompt!r}")
        for c in out.outputs:
            print(c.text)
            print(f"--- {len(c.token_ids)} tokens, finish_reason={c.finish_reason}")
    llm.shutdown()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from zllm.entrypoints.server import serve

    return serve(serve_config(args))


def serve_config(args: argparse.Namespace) -> EngineConfig:
    if args.config_file and args.config:
        raise ValueError("give the config file once: as CONFIG or as --config")
    args.config = args.config or args.config_file
    config = config_from_args(args)
    if args.model is not None and args.served_model_name is None:
        config.set("served_model_name", None)  # the file's name was for the file's model
    # The one place zllm reads the environment for a setting: a key kept out of YAML files.
    if config.server.api_key is None and os.environ.get("ZLLM_API_KEY"):
        config.set("api_key", os.environ["ZLLM_API_KEY"])
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zllm", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    gen = verbs.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sample-seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--raw", action="store_true",
                     help="send prompts as plain text, without the model's chat template")
    add_config_flags(gen, offline=True)
    srv = verbs.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                           description="Serve an OpenAI-compatible HTTP API. Every config key can be "
                           "set in the YAML file and overridden by its flag; the API key can also "
                           "come from $ZLLM_API_KEY.")
    srv.add_argument("config_file", nargs="?", metavar="CONFIG.yaml", help="a YAML config file")
    add_config_flags(srv)
    bench = verbs.add_parser("bench", help="run a benchmark program (zllm bench NAME --help)")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verb == "bench":
        return importlib.import_module(BENCHMARKS[args.name]).main(args.bench_args) or 0
    try:
        return cmd_serve(args) if args.verb == "serve" else cmd_generate(args)
    except ValueError as e:
        print(f"zllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
