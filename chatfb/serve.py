"""Start the whole app: settings -> runtime (store, model server, control API) -> Gradio UI, with the
OpenAI-compatible API (chatfb.ui.openai_api) on the same port.

On a Hugging Face Space (SPACE_ID set) data goes to the persistent /data volume when the Space
has one; otherwise the UI warns that storage is ephemeral. SIGTERM and Ctrl-C (SIGINT) both run
`Runtime.close()` and exit, so the model server and a learning cycle stop with the app.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from chatfb.config import Settings

log = logging.getLogger(__name__)


def space_settings(settings: Settings, env=os.environ, persistent=Path("/data")) -> Settings:
    """Adjust settings for a Hugging Face Space: persistent storage and a daily cycle by default."""
    if not env.get("SPACE_ID"):
        return settings
    changes = {}
    if "CHATFB_DATA_DIR" not in env:
        if persistent.is_dir() and os.access(persistent, os.W_OK):
            changes["data_dir"] = persistent / "chatfb"
        else:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            (settings.data_dir / ".ephemeral").touch()
    if "CHATFB_NIGHTLY_AT" not in env and settings.nightly_at is None:
        changes["nightly_at"] = "03:00"
    return settings.with_(**changes) if changes else settings


def install_shutdown_handlers(rt) -> None:
    """On SIGTERM or SIGINT: close the runtime (it ends its child process groups), then exit at once;
    Gradio's server threads need no goodbye, and a second signal must not interrupt the close."""
    def shutdown(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("%s: stopping the model server and any learning cycle", signal.Signals(signum).name)
        try:
            rt.close()
        finally:
            logging.shutdown()
            os._exit(0 if signum == signal.SIGTERM else 128 + signum)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)


def serve(settings: Settings, block: bool = True):
    from chatfb.app.runtime import Runtime
    from chatfb.ui.chat_tab import PAGE_CSS, PAGE_JS, build_ui
    from chatfb.ui.openai_api import api_routes

    settings = space_settings(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    rt = Runtime.start(settings)
    install_shutdown_handlers(rt)
    demo = build_ui(rt)
    demo.queue(default_concurrency_limit=settings.chat_concurrency)
    server_name = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    try:
        # the OpenAI-compatible API (docs/api.md) on the same port, its routes ahead of Gradio's
        demo.launch(server_name=server_name, show_error=False, prevent_thread_lock=not block,
                    footer_links=["api", "gradio"], app_kwargs={"routes": api_routes(rt)}, css=PAGE_CSS, js=PAGE_JS)
    finally:
        if block:
            rt.close()
    return rt, demo
