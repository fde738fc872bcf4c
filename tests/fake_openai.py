"""A tiny OpenAI-compatible chat server for fault tests that need a model process to kill or
flood, not a real model: `python tests/fake_openai.py PORT [WORDS_PER_REPLY] [DELAY_S] [MODEL_ROOT]`.
Streams "word0 word1 ..." as SSE; /health and /v1/models answer like vLLM's (MODEL_ROOT is the
`root` it reports, vLLM's model folder)."""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
        for i, w in enumerate(words):
            chunk = {"choices": [{"delta": {"content": (" " if i else "") + w}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(self.delay)
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(words)}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


if __name__ == "__main__":
    Handler.words = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    Handler.delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    Handler.root = sys.argv[4] if len(sys.argv) > 4 else Handler.root
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
