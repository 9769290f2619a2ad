"""One of N API server processes under `zllm.entrypoints.supervisor` (not started by hand).

It reads two JSON lines on stdin: its settings (the config, the engine core's address) at once,
and the core's ready message when the core has started (meanwhile it loads its tokenizer),
inherits the core's status pipe by file descriptor, and serves HTTP on the shared port
(SO_REUSEPORT) until SIGTERM or the core's death.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from zllm.config import EngineConfig
from zllm.entrypoints.server import run_api_server
from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.core_client import CoreHandle, read_line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stdin = sys.stdin.fileno()
    info = json.loads(read_line(stdin))
    config = EngineConfig.from_dict(info["config"])
    # The core's ready message follows on stdin once the supervisor has it.
    core = CoreHandle(info["address"], args.status_fd, None, {}, ready_fd=stdin)
    llm = AsyncLLM(config, core=core)
    engine_s = time.perf_counter() - info["started"]  # one monotonic clock for the whole host
    return asyncio.run(run_api_server(llm, config, info["started"], engine_s, index=args.index))


if __name__ == "__main__":
    sys.exit(main())
