"""The main job, end to end: start the server on the built-in demo models, ask each model
something through SGLang's native API and the OpenAI API, print the answers, stop the server.

    scripts/quickstart.sh            (installs first; or: .venv/bin/python scripts/quickstart.py)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode} before it was ready")
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit("the server was not ready in time")


def main() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sglang_crosspool.launch", "--port", str(port)]
    print("$ python", " ".join(cmd[1:]), flush=True)
    server = subprocess.Popen(cmd)
    try:
        wait_healthy(base, server)
        models = [m["id"] for m in call(base + "/v1/models")["data"]]
        print(f"\nserving {len(models)} models: {', '.join(models)}")
        for name in models:
            out = call(base + "/generate", {
                "model": name, "text": "The capital of France is",
                "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
            meta = out["meta_info"]
            print(f"\n[{name}] POST /generate -> {out['text']!r}")
            print(f"  {meta['completion_tokens']} tokens, finish_reason={meta['finish_reason']}")
        chat = call(base + "/v1/chat/completions", {
            "model": models[0], "max_tokens": 12,
            "messages": [{"role": "user", "content": "Say hello."}]})
        print(f"\n[{models[0]}] POST /v1/chat/completions -> "
              f"{chat['choices'][0]['message']['content']!r}")
        print("\n(the demo models have random weights: the text is gibberish by design)")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
