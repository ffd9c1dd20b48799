"""A fake language model on a local port: ``POST /v1/chat/completions`` with an
OpenAI-style body answers with a made-up completion after a short "thinking" delay. Nothing
leaves the machine. Run it alone (``python fake_model.py 8099``) or let model_agent.py start
it in a thread."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Tuple


def complete(messages: Any) -> Dict[str, Any]:
    prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    words = prompt.split()
    text = f"[fake-model {digest}] " + " ".join(reversed(words[-12:]))
    return {
        "id": f"cmpl-{digest}",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": len(words), "completion_tokens": min(12, len(words)), "total_tokens": len(words) + min(12, len(words))},
    }


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        time.sleep(0.2)  # thinking
        reply = json.dumps(complete(body.get("messages", []))).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def serve_in_thread(port: int = 0) -> Tuple[ThreadingHTTPServer, str]:
    """Starts the fake model on ``port`` (0: any free one); returns the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 8099), Handler)
    print(f"fake model on http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions", flush=True)
    srv.serve_forever()
