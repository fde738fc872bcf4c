"""The vLLM server a benchmark talks to: one already running (--vllm-url), or a managed one it starts.

A managed server is `chatfb.serving.vllm_server.ManagedVLLM` on a free loopback port, serving the
embedded model (`chatfb.serving.model_files.resolve_model("embedded", data_dir)`) or --model-dir under
the name chatfb-base, exactly as the app starts it. Its log goes to <data_dir>/logs/vllm-bench.log.
"""

from __future__ import annotations

import argparse
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from chatfb.config import VLLM_DTYPES

SERVED_NAME = "chatfb-base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vllm-url", default=None,
                   help="an already running vLLM server (served model name chatfb-base); default: start one")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="base model folder (default: the one the server serves, else the embedded model)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="chatfb data folder: embedded model cache and the managed server's log")
    p.add_argument("--api-key", default=None, help="API key for --vllm-url")
    p.add_argument("--max-lora-rank", type=int, default=16, help="managed server: --max-lora-rank")
    p.add_argument("--kvcache-gib", type=int, default=1, help="managed server on CPU: KV-cache GiB")
    p.add_argument("--dtype", default="auto", choices=VLLM_DTYPES,
                   help="managed server: weights dtype, as CHATFB_VLLM_DTYPE (auto: bfloat16 on a CPU with bf16 instructions)")
    p.add_argument("--max-loras", type=int, default=4, help="managed server: --max-loras (adapters in one batch)")
    p.add_argument("--startup-timeout-s", type=float, default=900.0, help="managed server: how long to wait for /health")


@dataclass
class Server:
    url: str
    model_dir: Path | None  # None when the server's model folder is not known here
    managed: object | None  # the ManagedVLLM we started, if any
    relaunch: Callable[[], object] | None  # start a fresh ManagedVLLM on the same port (restart benchmark)


def served_model_root(url: str, api_key: str | None = None) -> Path | None:
    """The local folder vLLM serves chatfb-base from, when it is on this machine."""
    from chatfb.serving.model_client import served_root

    root = served_root(url, SERVED_NAME, api_key, timeout_s=10.0)
    return Path(root) if root and Path(root).is_dir() else None


@contextmanager
def managed_vllm(model_dir: Path, args: argparse.Namespace) -> Iterator[Server]:
    """Start a ManagedVLLM on a free port; `relaunch` starts a fresh one on the same port."""
    from chatfb.config import Settings
    from chatfb.serving.vllm_server import ManagedVLLM

    port = free_port()
    settings = Settings(data_dir=Path(args.data_dir), served_model_name=SERVED_NAME, max_lora_rank=args.max_lora_rank,
                        vllm_kvcache_gib=args.kvcache_gib, vllm_startup_timeout_s=args.startup_timeout_s,
                        vllm_dtype=args.dtype, vllm_max_loras=getattr(args, "max_loras", 4))

    def launch() -> ManagedVLLM:
        server = ManagedVLLM.from_settings(settings, model_dir, port, log_role="bench", weight_reload=True)
        print(f"starting vLLM on port {port} with {model_dir} (log: {server.log_path}) ...", flush=True)
        server.start()
        return server

    handle = Server(f"http://127.0.0.1:{port}", Path(model_dir), launch(), launch)
    try:
        yield handle
    finally:
        if handle.managed is not None:
            handle.managed.stop()


@contextmanager
def vllm_server(args: argparse.Namespace) -> Iterator[Server]:
    """The server named by --vllm-url, or a managed one on the embedded model (or --model-dir)."""
    if args.vllm_url:
        model_dir = args.model_dir or served_model_root(args.vllm_url, args.api_key)
        yield Server(args.vllm_url.rstrip("/"), model_dir, None, None)
        return
    from chatfb.serving.model_files import resolve_model

    with managed_vllm(args.model_dir or resolve_model("embedded", args.data_dir), args) as server:
        yield server
