"""One of N API server processes under `zllm.entrypoints.supervisor` (not started by hand).

It reads its settings as JSON on stdin (the config, the engine core's address and readiness),
inherits the core's status pipe by file descriptor, and serves HTTP on the shared port
(SO_REUSEPORT) until SIGTERM or the core's death.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from zllm.config import EngineConfig
from zllm.entrypoints.server import run_api_server
from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.core_client import CoreHandle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = json.loads(sys.stdin.read())
    config = EngineConfig.from_dict(info["config"])
    core = CoreHandle(info["address"], args.status_fd, None, info["ready"])
    llm = AsyncLLM(config, core=core)
    return asyncio.run(run_api_server(llm, config, info["started"], info["engine_s"],
                                      index=args.index))


if __name__ == "__main__":
    sys.exit(main())
