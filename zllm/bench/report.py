"""Where benchmark results go: a JSON file and a dated table in docs/benchmarks.md."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
from typing import Any, Optional


def environment() -> dict[str, str]:
    """Date, device and the versions that move the numbers."""
    import msgpack
    import ray
    import torch
    import transformers
    import zmq

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "pyzmq": zmq.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda or ""
        for name in ("flashinfer", "triton"):  # the attention kernels' sources
            try:
                env[name] = importlib.import_module(name).__version__
            except ImportError:
                pass
    else:
        env["device"] = f"CPU: {_cpu_name()}, {os.cpu_count()} cores"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_report_args(parser, out: Optional[str] = None,
                    markdown: str = "docs/benchmarks.md") -> None:
    """--out (the JSON report) and --markdown (a section appended to a file), as write_results
    takes them."""
    parser.add_argument("--out", default=out, help="write the report as JSON here")
    parser.add_argument("--markdown", default=markdown,
                        help="append a section with the results to this file ('' to skip)")


def write_results(title: str, config: dict[str, Any], rows: list[dict[str, Any]],
                  out: Optional[str], markdown: Optional[str] = "docs/benchmarks.md",
                  notes: str = "", extra: Optional[dict[str, Any]] = None) -> None:
    """Print a table; write {environment, config, rows} (and `extra`, the raw details) as JSON
    to `out`; append to `markdown`."""
    env = environment()
    table = _table(rows)
    print(table)
    if out:
        with open(out, "w") as f:
            json.dump({"title": title, "environment": env, "config": config, "rows": rows,
                       "details": extra}, f, indent=2)
    if markdown:
        os.makedirs(os.path.dirname(markdown) or ".", exist_ok=True)
        new = not os.path.exists(markdown)
        with open(markdown, "a") as f:
            if new:
                f.write("# zllm benchmarks\n\nEach section is one run of `zllm bench`; newest last.\n")
            f.write(f"\n## {title}\n\n")
            f.write("; ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n")
            f.write("config: " + ", ".join(f"{k}={v}" for k, v in config.items()) + "\n\n")
            f.write(table + "\n")
            if notes:
                f.write("\n" + notes + "\n")


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
