"""The plan beside what the running server reports, device by device (`GET /plan`).

In: the plan.json the server was launched with (`--plan`), its pool mode, the plan-device
index of each attention worker, and the engine's merged stats. Out: per plan device, the
planned weight bytes, KV pages and models next to the reported ones (parameter bytes the
workers and FFN servers hold, KV pages of the worker's pool, the allocator's and the
device's own figures where the device has them), and the reported/planned weight ratio.
Pure Python: the HTTP process answers it without touching a device.
"""

from __future__ import annotations


def plan_report(plan, mode_name: str, plan_index: tuple[int, ...], stats: dict) -> dict:
    mode = plan.mode(mode_name)
    workers = stats.get("workers") or []
    reported: dict[int, dict] = {}

    def at(index: int) -> dict:
        return reported.setdefault(index, {"weights_bytes": 0, "kv_pages": 0, "models": [],
                                           "device_memory": None, "device": None})

    for position, w in enumerate(workers):
        index = plan_index[position] if position < len(plan_index) else position
        r = at(index)
        r["device"] = w.get("device")
        r["weights_bytes"] += w.get("attention_bytes") or 0
        if not mode.weights_devices:  # crosspool: the FFN servers' bytes count below
            r["weights_bytes"] += w.get("ffn_bytes_here") or 0
        r["kv_pages"] += (w.get("kv") or {}).get("total_pages") or 0
        r["models"] += list(w.get("models") or [])
        r["device_memory"] = w.get("device_memory")
        if mode.weights_devices:  # FFN server s runs on weights_devices[s]
            for s, nbytes in enumerate(w.get("ffn_bytes_per_server") or []):
                if s < len(mode.weights_devices):
                    ffn = at(mode.weights_devices[s])
                    ffn["weights_bytes"] += nbytes
                    ffn["device"] = ffn["device"] or w.get("ffn_device")
    devices = []
    for d in mode.devices:
        planned = {"weights_bytes": int(d.weights_bytes), "kv_pages": int(d.kv_pages),
                   "models": list(d.holds), "role": d.role}
        got = reported.get(d.index)
        ratio = (got["weights_bytes"] / planned["weights_bytes"]
                 if got and planned["weights_bytes"] else None)
        devices.append({"index": d.index, "planned": planned, "reported": got,
                        "weights_ratio": ratio})
    return {"mode": mode_name, "served": list(mode.served), "devices": devices,
            "weights_devices": list(mode.weights_devices), "kv_devices": list(mode.kv_devices)}
