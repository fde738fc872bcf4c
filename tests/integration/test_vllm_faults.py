"""Faults of the real vLLM CPU server behind the running app: killed mid-stream, refused adapters."""

import os
import signal
import subprocess
import time

import pytest
from gradio_client import Client

from chatfb.serving.model_client import ModelClient

from .conftest import ADMIN_PASSWORD, wait_until

pytestmark = pytest.mark.integration


def live_name(app):
    with app.snapshot_store() as s:
        live = s.live_adapter()
    return live["name"] if live else None


def register(app, name, path_maker):
    """Put an adapter folder under the app's data dir and record it through the control API."""
    from chatfb.app.control import open_backend

    folder = app.data_dir / "adapters" / name
    path_maker(folder)
    backend = open_backend(app.data_dir)
    try:
        backend.add_adapter(name, name)
    finally:
        backend.close()


def peft_adapter(base, rank, folder):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(folder)


def test_refused_adapters_leave_the_current_one_serving(app, vllm_url, embedded_model):
    before = live_name(app)
    client = ModelClient(vllm_url)
    register(app, "chatfb-v0901", lambda f: peft_adapter(embedded_model, 32, f))  # rank > --max-lora-rank 16

    def corrupt(folder):
        peft_adapter(embedded_model, 4, folder)
        (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)

    register(app, "chatfb-v0902", corrupt)
    # rank 32: vLLM refuses it; damaged weights: chatfb's check of the weights' shapes refuses them first
    for name, why in (("chatfb-v0901", "refused adapter"), ("chatfb-v0902", "unreadable weights")):
        out = app.cli("adapters", "promote", name, check=False)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert live_name(app) == before and name not in client.models(), f"a refused {name} changed what is served"
    # the same refusal in the admin view, as a clear message
    admin = Client(app.url, verbose=False)
    admin.predict(ADMIN_PASSWORD, api_name="/admin_unlock")
    note = admin.predict("chatfb-v0901", api_name="/promote")
    assert note.startswith("⚠️ vLLM refused adapter chatfb-v0901 at "), note
    # path tricks are refused too
    note = admin.predict("../../etc", api_name="/promote")
    assert note.startswith("⚠️"), f"a path outside the adapters folder was not refused: {note!r}"
    # chats are unaffected
    shown = Client(app.url, verbose=False).predict("Hello!", "", api_name="/send")[0]
    assert (before or "chatfb-base") in shown[-1]["content"][0]["text"], f"a refused promote changed chats: {shown[-1]}"


def last_reply_status(app) -> str:
    with app.snapshot_store() as s:
        return s._q("SELECT status FROM messages WHERE role = 'assistant' ORDER BY created_at DESC LIMIT 1")[0][0]


def test_vllm_killed_mid_stream_then_restarted_by_the_app(app, vllm_url):
    live = live_name(app)
    port = vllm_url.rsplit(":", 1)[1]
    pid = int(subprocess.run(["pgrep", "-f", f"api_server.*--port {port}"], capture_output=True, text=True).stdout.split()[0])
    # A 64-token reply can finish on the server before the app's stream reaches this client, so
    # the server is frozen (SIGSTOP) at the first streamed output, and killed only once the reply
    # is known to be unfinished (still pending while nothing can finish it). If the whole reply
    # was already out, the server is thawed and the turn tried again with a new prompt.
    for attempt in range(3):
        job = Client(app.url, verbose=False).submit(f"Write a long story about a dragon who learns to cook ({attempt}).",
                                                    "", api_name="/send")
        wait_until(lambda: len(job.outputs()) >= 2, 120, "the reply to start streaming", 0.01)
        os.killpg(pid, signal.SIGSTOP)
        time.sleep(1.0)
        if last_reply_status(app) == "pending":
            break
        os.killpg(pid, signal.SIGCONT)
        job.result(timeout=60)
    else:
        pytest.fail("every reply finished before vLLM could be frozen mid-stream")
    os.killpg(pid, signal.SIGKILL)
    shown = job.result(timeout=120)[0]
    text = shown[-1]["content"][0]["text"]
    assert "⚠️" in text and "Traceback" not in text and "127.0.0.1" not in text, text
    assert last_reply_status(app) == "failed", "the reply cut off by the dead server must be stored as failed"
    client = ModelClient(vllm_url)
    wait_until(lambda: client.healthy(), 300, "the app to restart vLLM")
    if live:
        wait_until(lambda: live in client.models(), 60, "the live adapter to be loaded again")
    shown = Client(app.url, verbose=False).predict("Are you back?", "", api_name="/send")[0]
    text = shown[-1]["content"][0]["text"]
    assert "⚠️" not in text and (live or "chatfb-base") in text, f"no good reply after vLLM was restarted: {text!r}"
