from setuptools import find_packages, setup

setup(
    name="zllm",
    version="0.1.0",
    description="A from-scratch LLM serving runtime: paged KV cache, continuous batching, "
                "tensor parallelism on Ray",
    packages=find_packages(include=["zllm", "zllm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first, by hand (see README): a CPU wheel here, CUDA on GPU machines.
        "torch>=2.4,<3",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "fairscale>=0.4.13",
        "ray>=2.30",
        "pyzmq>=25",
        "msgpack>=1.0",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "jinja2>=3",
        # zllm serve and zllm.AsyncClient: one library that is both an asyncio HTTP server and
        # client (see the commit that added it).
        "aiohttp>=3.9",
        # GGUF checkpoints, the default model's format: llama.cpp's own reader and
        # (de)quantiser, the format's reference implementation (numpy only, no native code).
        "gguf>=0.17",
        # Structured outputs (JSON schema, regex, choice, EBNF): grammars compiled against the
        # vocabulary and token bitmasks filled in parallel; vLLM's and SGLang's default backend.
        "xgrammar>=0.2.8",
    ],
    extras_require={
        # accelerate: transformers loads GGUF files (the tests' reference) only with it.
        # jsonschema: structured-output tests validate outputs against their schemas.
        # triton: the tests run zllm's Triton decode kernel on its CPU interpreter (3.7 is the
        # first whose interpreter takes a loop bound loaded from memory). CUDA builds of torch
        # ship it already; it has wheels for Linux only.
        "test": ["pytest>=8", "openai>=1.0", "accelerate>=1.0", "jsonschema>=4",
                 "triton>=3.7; platform_system == 'Linux'"],
        "gpu": ["flashinfer-python>=0.6"],
    },
    entry_points={"console_scripts": ["zllm=zllm.cli:main"]},
)
