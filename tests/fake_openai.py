"""A tiny OpenAI-compatible chat server for fault tests that need a model process to kill or
flood, not a real model: `python tests/fake_openai.py PORT [WORDS_PER_REPLY] [DELAY_S] [MODEL_ROOT]`.
Streams "word0 word1 ..." as SSE; /health and /v1/models answer like vLLM's (MODEL_ROOT is the
`root` it reports, vLLM's model folder)."""

import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    words = 5
    delay = 0.0
    root = "/fake/model"

    def log_message(self, *a):
        pass

    def _json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._json(200, {})
        if self.path == "/v1/models":
            return self._json(200, {"data": [{"id": "chatfb-base", "root": self.root}]})
        self._json(404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        words = [f"word{i}" for i in range(self.words)]
        if not body.get("stream"):  # one word per token; max_tokens cuts the reply like vLLM ("length")
            cut = words[:body.get("max_tokens", len(words))]
            choice = {"message": {"content": " ".join(cut)}, "finish_reason": "length" if len(cut) < len(words) else "stop"}
            return self._json(200, {"choices": [choice] * body.get("n", 1)})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        cut = words[:body.get("max_tokens", len(words))]  # as above; the last chunk says why it ended, like vLLM's
        for i, w in enumerate(cut):
            finish = ("length" if len(cut) < len(words) else "stop") if i == len(cut) - 1 else None
            chunk = {"choices": [{"delta": {"content": (" " if i else "") + w}, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(self.delay)
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(cut)}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


class ReplicaHandler(Handler):
    """A vLLM replica with LoRA: answers only the base model and adapters it holds (404 otherwise, like vLLM),
    loads them by /v1/load_lora_adapter or, like vLLM's filesystem resolver, from `lora_dir` on the first
    request naming one whose adapter_config.json names `root` as base model. Counts requests per model."""

    lora_dir = None
    refuse_load = False  # /v1/load_lora_adapter answers 400, like vLLM given a bad adapter
    loaded: dict  # name -> path
    served: dict  # model name -> requests answered
    bodies: list  # the chat requests' JSON bodies, in order

    def _models(self):
        return [{"id": "chatfb-base", "root": self.root}] + [{"id": n, "root": p} for n, p in self.loaded.items()]

    def _resolve(self, name):
        if name == "chatfb-base" or name in self.loaded:
            return True
        config = Path(self.lora_dir or "/nonexistent") / name / "adapter_config.json"
        if config.exists() and json.loads(config.read_text()).get("base_model_name_or_path") == self.root:
            self.loaded[name] = str(config.parent)
            return True
        return False

    def do_GET(self):
        if self.path == "/v1/models":
            return self._json(200, {"data": self._models()})
        super().do_GET()

    def do_POST(self):
        if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.startswith("/v1/load"):
                if self.refuse_load:
                    return self._json(400, {"error": {"message": "bad adapter"}})
                self.loaded[body["lora_name"]] = body["lora_path"]
            elif self.loaded.pop(body["lora_name"], None) is None:
                return self._json(404, {"error": {"message": "not loaded"}})
            return self._json(200, {})
        length = int(self.headers["Content-Length"])
        raw = self.rfile.read(length)
        model = json.loads(raw).get("model")
        if not self._resolve(model):
            return self._json(404, {"error": {"message": f"The model `{model}` does not exist."}})
        self.served[model] = self.served.get(model, 0) + 1
        self.bodies.append(json.loads(raw))
        self.rfile = io.BytesIO(raw)  # the parent reads the body again
        super().do_POST()


def start_replica(root="/models/base", lora_dir=None):
    """An in-process ReplicaHandler server on a free loopback port; returns (server, its handler class).
    Stop it with server.shutdown()."""
    handler = type("Replica", (ReplicaHandler,), {"root": root, "lora_dir": lora_dir, "loaded": {}, "served": {}, "bodies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


if __name__ == "__main__":
    Handler.words = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    Handler.delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    Handler.root = sys.argv[4] if len(sys.argv) > 4 else Handler.root
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
