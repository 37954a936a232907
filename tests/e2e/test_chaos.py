"""Chaos on loopback, bounded in time: normal traffic mixed with hostile requests, clients that
disconnect and FFN servers killed (and restarted), then SIGTERM while requests run.

Afterwards every normal request either gave the tokens of a clean run or ended with a clear
error (a status and a message), every hostile one got a 4xx, no KV page is left in use, and
once the server has stopped (exit 0) no process, temp folder or shared-memory segment is left.
The counts are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from sglang_crosspool.testing.faults import ffn_server_pids

CHAOS_S = 15.0
PROMPTS = [[5, 6, 7, 8], list(range(40, 58)), [300, 301], [77] * 9, [1, 2, 3, 4, 5, 6]]
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
HOSTILE = [
    {"input_ids": [1, 2], "sampling_params": {"seed": 2**64}},
    {"input_ids": [1, 2], "sampling_params": {"repetition_penalty": 1e-45}},
    {"input_ids": [1, 2], "sampling_params": {"n": 10**6}},
    {"input_ids": [1, 10**9]},
    {"input_ids": [5] * 5000},
    {"text": "a", "stream": "yes"},
    b'{"text": "\\ud800"}',
    b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"{not json",
]


def _generate(url: str, ids: list[int], stream: bool) -> tuple[list[int] | None, tuple | None]:
    """(output ids, None) or (None, (status, message)) for a request that ended with an error."""
    body = {"input_ids": ids, "sampling_params": GREEDY, "stream": stream}
    if not stream:
        r = httpx.post(url, json=body, timeout=120)
        if r.status_code == 200:
            return r.json()["output_ids"], None
        return None, (r.status_code, r.json()["error"]["message"])
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        if r.status_code != 200:
            return None, (r.status_code, json.loads(r.read())["error"]["message"])
        last = None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[len("data: "):])
    reason = last["meta_info"]["finish_reason"]
    if reason["type"] == "abort":
        return None, (reason.get("status_code"), reason.get("message"))
    return last["output_ids"], None


@pytest.mark.skipif(not Path("/proc").is_dir() or not Path("/dev/shm").is_dir(),
                    reason="reads /proc and /dev/shm")
def test_chaos(model_paths, launch_server, monkeypatch):
    tmp = Path(tempfile.mkdtemp(prefix="chaos", dir="/tmp"))  # short: ZeroMQ IPC paths
    monkeypatch.setenv("TMPDIR", str(tmp))
    try:
        _chaos(launch_server({"qwen-a": model_paths["qwen-a"]}, "--skip-server-warmup",
                             "--pool-mode", "crosspool", "--ffn-servers", "2",
                             "--ffn-transport", "shm", "--shutdown-timeout", "2"), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _chaos(s, tmp: Path) -> None:
    url = s.url + "/generate"
    clean = [_generate(url, ids, False)[0] for ids in PROMPTS]
    scheduler = s.internal_state()["scheduler_pid"]
    stop = time.monotonic() + CHAOS_S
    counts, problems, lock = Counter(), [], threading.Lock()

    def count(key: str, problem: str | None = None) -> None:
        with lock:
            counts[key] += 1
            if problem:
                problems.append(problem)

    def normal(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            i = rng.randrange(len(PROMPTS))
            ids, error = _generate(url, PROMPTS[i], rng.random() < 0.5)
            if ids is not None:
                count("completed", None if ids == clean[i] else f"prompt {i}: {ids} != "
                                                                 f"{clean[i]}")
            else:
                count("errored", None if error[0] in (500, 503) and error[1] else
                      f"prompt {i}: unclear error {error}")
                time.sleep(0.2)  # as a client told to retry later would

    def hostile(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            body = rng.choice(HOSTILE)
            kw = {"content": body, "headers": {"content-type": "application/json"}} \
                if isinstance(body, bytes) else {"json": body}
            r = httpx.post(url, timeout=120, **kw)
            count("hostile", None if 400 <= r.status_code < 500 else
                  f"hostile {str(body)[:60]}: {r.status_code} {r.text[:200]}")

    def disconnecter(seed: int) -> None:
        rng = random.Random(seed)
        body = {"input_ids": [9, 9, 9], "stream": True,
                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        while time.monotonic() < stop:
            try:
                if rng.random() < 0.5:
                    with httpx.stream("POST", url, json=body, timeout=120) as r:
                        for k, _ in enumerate(r.iter_lines()):
                            if k == 4:
                                break  # gone mid-stream
                else:
                    httpx.post(url, json={**body, "stream": False}, timeout=0.2)
            except httpx.ReadTimeout:
                pass
            count("disconnects")

    def killer() -> None:
        rng = random.Random(4)
        time.sleep(3)
        while time.monotonic() < stop - 3:
            pids = ffn_server_pids(scheduler)
            if len(pids) == 2 and s.get("/health").status_code == 200:
                os.kill(rng.choice(pids), signal.SIGKILL)
                count("ffn_kills")
                time.sleep(5)
            time.sleep(0.2)

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=hostile, args=(10,)),
                threading.Thread(target=disconnecter, args=(11,)), threading.Thread(target=killer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CHAOS_S + 180)
    assert not any(t.is_alive() for t in threads)

    deadline = time.monotonic() + 90  # the last FFN server killed comes back
    while s.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the weights pool did not recover"
        time.sleep(0.2)
    state = s.wait_idle(timeout=30)
    pages_leaked = state["kv"]["used_pages"]
    assert _generate(url, PROMPTS[1], True)[0] == clean[1]  # serves as before

    # SIGTERM while requests run: each completes or ends with an error; the server exits 0.
    at_stop: list = []
    started = threading.Semaphore(0)

    def late(i: int) -> None:
        body = {"input_ids": PROMPTS[i], "stream": True,
                "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            last = None
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    if last is None:
                        started.release()
                    last = json.loads(line[len("data: "):])
        at_stop.append(last["meta_info"]["finish_reason"])

    late_threads = [threading.Thread(target=late, args=(i,)) for i in range(3)]
    for t in late_threads:
        t.start()
    assert all(started.acquire(timeout=60) for _ in late_threads)  # all three run
    survivors = ffn_server_pids(scheduler)
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=60)
    for t in late_threads:
        t.join(timeout=60)
    left = [p for p in [scheduler, *survivors] if Path(f"/proc/{p}").exists()]
    counts.update(sent=counts["completed"] + counts["errored"], pages_leaked=pages_leaked,
                  processes_left=len(left))
    print(f"\nchaos over {CHAOS_S:.0f} s: {dict(counts)}; at SIGTERM: "
          f"{[r['type'] for r in at_stop]}")
    assert not problems, problems
    assert counts["completed"] and counts["hostile"] and counts["disconnects"]
    assert counts["ffn_kills"] >= 1
    assert pages_leaked == 0
    assert s.proc.returncode == 0, s.log.read_text()[-3000:]
    assert len(at_stop) == 3 and all(r["type"] == "length" or "shut down" in r["message"]
                                     for r in at_stop), at_stop
    assert not left, left
    assert not list(tmp.iterdir()), list(tmp.iterdir())
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"cp{scheduler}-")]
