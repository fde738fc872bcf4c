"""The chat app end to end: real vLLM CPU server, real DuckDB file, gradio_client, CLI."""

import json

import pytest
from datasets import load_dataset
from gradio_client import Client

from chatfb.serving.model_client import ModelClient, StreamResult

from .conftest import listen_addresses

pytestmark = pytest.mark.integration


def test_streaming_through_the_apps_client(vllm_url):
    client = ModelClient(vllm_url)
    result = StreamResult()
    deltas = list(client.stream_chat([{"role": "user", "content": "Count from one to five."}], "chatfb-base",
                                     max_tokens=32, temperature=0.0, result=result))
    assert len(deltas) > 3 and "".join(deltas) == result.text and result.text.strip(), (deltas, result.text)
    assert result.ttft_ms is not None and result.ttft_ms < result.latency_ms, (result.ttft_ms, result.latency_ms)
    assert 0 < result.completion_tokens <= 32 and result.prompt_tokens > 0, (result.completion_tokens, result.prompt_tokens)
    assert client.models() == ["chatfb-base"]


def test_chat_and_feedback_through_gradio_client(app):
    c = Client(app.url, verbose=False)
    shown, target, box = c.predict("What is the capital of France?", "You are a helpful assistant.", api_name="/send")
    assert box == "" and shown[0]["role"] == "user" and shown[-1]["role"] == "assistant", (box, shown)
    reply = shown[-1]["content"][0]["text"]
    assert "chatfb-base" in reply and len(reply) > len("*— chatfb-base*"), f"no reply text or model tag: {reply!r}"
    for note in (c.predict("Too long, answer in one word.", api_name="/critique")[0],
                 c.predict("Paris.", api_name="/correct")[0], c.predict(api_name="/thumbs_down")):
        assert note.startswith("✅"), f"feedback refused: {note!r}"
    # empty message: refused, nothing stored
    before = app.snapshot_store()
    n_before = before.counts()["messages"]
    before.close()
    c.predict("   ", "", api_name="/send")
    with app.snapshot_store() as s:
        assert s.counts()["messages"] == n_before, "an empty message was stored"
        fb = {f.kind: f for f in s.feedback_records()}
        assert fb["critique"].text == "Too long, answer in one word." and fb["correction"].text == "Paris."
        assert fb["correction"].prompt[-1] == {"role": "user", "content": "What is the capital of France?"}
        assert fb["rating"].rating == -1
        msgs = s._q("SELECT role, status, model, ttft_ms, completion_tokens FROM messages ORDER BY created_at")
        assert ("assistant", "ok", "chatfb-base") == msgs[-1][:3] and msgs[-1][3] > 0 and msgs[-1][4] > 0, \
            f"the reply's row lacks its model, timing or token count: {msgs[-1]}"


def test_cli_export_and_import_while_the_app_runs(app, tmp_path):
    src = tmp_path / "fb.jsonl"
    src.write_text(json.dumps({"prompt": "Say hi", "reply": "Hello there, how are you today?", "kind": "correction",
                               "text": "Hi!"}) + "\n" + json.dumps({"prompt": "q", "reply": "r", "kind": "rating", "rating": 1}) + "\n")
    out = app.cli("import-feedback", str(src))
    assert "imported 2" in out.stdout, out.stdout + out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "reply": "r", "kind": "rating", "rating": 7}\nnot json\n')
    out = app.cli("import-feedback", str(bad), check=False)
    assert out.returncode == 2 and "line 1" in out.stderr and "line 2" in out.stderr and "Traceback" not in out.stderr, \
        f"a bad file must be refused (exit 2) naming each bad line, without a trace: {out.returncode} {out.stderr}"
    for fmt in ("sft", "dpo", "kto"):
        app.cli("export", "--format", fmt, "--out", str(tmp_path / "out"))
    sft = load_dataset("json", data_files=str(tmp_path / "out" / "sft.jsonl"), split="train")
    assert {"role": "assistant", "content": "Hi!"} in [m["messages"][-1] for m in sft], "the correction is not an SFT target"
    dpo = load_dataset("json", data_files=str(tmp_path / "out" / "dpo.jsonl"), split="train")
    assert any(r["chosen"][0]["content"] == "Hi!" and r["rejected"][0]["content"].startswith("Hello there") for r in dpo), \
        "no DPO pair with the correction chosen over the reply"
    kto = load_dataset("json", data_files=str(tmp_path / "out" / "kto.jsonl"), split="train")
    assert True in kto["label"], "no desirable KTO example"


def test_managed_vllm_listens_on_loopback_only(app, vllm_url):
    assert vllm_url.startswith("http://127.0.0.1:"), vllm_url
    port = int(vllm_url.split(":")[2].split("/")[0])
    addresses = listen_addresses(port)
    assert addresses == [f"127.0.0.1:{port}"], addresses  # found, and on loopback only
