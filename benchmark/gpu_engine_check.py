"""GPU check of the engine (no server): bf16 greedy tokens against HF transformers on real-shaped
checkpoints (layer count cut to fit a short run), and eager decode time per token at batch 1.

    PYTHONPATH=.:scheduler:kernels python benchmark/gpu_engine_check.py --out results.json

Writes one JSON: per shape, tokens equal or not (and the first-step logits' max abs difference),
decode ms/token for the engine and for HF generate, and the HBM roofline of active weights.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sglang_crosspool import Engine
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.testing.checkpoints import hf_reference, make_model

SHAPES = [("olmoe", "olmoe-1b-7b"), ("qwen2_moe", "qwen1.5-moe-a2.7b"),
          ("qwen3_moe", "qwen3-30b-a3b")]
HBM_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.2e12}  # DESIGN.md section 7


def active_bytes_per_token(path: str) -> int:
    """Attention-side weights + the top-k experts (+ shared expert) of every layer, bf16."""
    spec, _ = resolve(path)
    h, L = spec.hidden_size, spec.num_layers
    attn = L * (h * (spec.q_size + 2 * spec.kv_size) + spec.q_size * h + spec.num_experts * h)
    experts = L * spec.top_k * 3 * h * spec.moe_intermediate_size
    shared = L * 3 * h * spec.shared_expert_intermediate_size
    return 2 * (attn + experts + shared + 2 * spec.vocab_size * h)


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def check(arch: str, size: str, layers: int, root: Path, gpu: str) -> dict:
    path = str(make_model(root / size, arch, size=size, dtype="bfloat16", device="cuda",
                          num_hidden_layers=layers))
    result = {"arch": arch, "shape": size, "layers": layers}
    hf = hf_reference(path, dtype=torch.bfloat16).to("cuda")
    engine = Engine(path, device="cuda", dtype="bfloat16", context_length=4096,
                    max_running_requests=4)
    prompts = [list(range(10, 42)), list(range(500, 507))]
    greedy = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    first_logits = {}
    engine.core.logits_observer = lambda rid, row: first_logits.setdefault(rid, row.clone())
    ours = engine.generate(input_ids=prompts, sampling_params=greedy, rid=["a", "b"])
    matches, diffs = [], []
    for rid, prompt, out in zip(["a", "b"], prompts, ours):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        ref_ids = ref.sequences[0, len(prompt):].tolist()
        same = [a == b for a, b in zip(out["output_ids"], ref_ids)]
        matches.append(sum(same) if all(same) else same.index(False))
        diffs.append(float((first_logits[rid] - ref.logits[0][0].float()).abs().max()))
    result["greedy_tokens_equal_prefix"] = matches  # of 16, per prompt
    result["first_step_logits_max_abs_diff"] = diffs
    # Decode at batch 1 after a 1k-token prompt, eager (no graphs, torch attention).
    prompt = list(range(1, 1025))
    n = 48
    params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=prompt, sampling_params=dict(params, max_new_tokens=4))  # warm
    t_prefill = timed(lambda: engine.generate(input_ids=prompt,
                                              sampling_params=dict(params, max_new_tokens=1)))
    t_all = timed(lambda: engine.generate(input_ids=prompt, sampling_params=params))
    result["engine_decode_ms_per_token_bs1_ctx1k"] = 1e3 * (t_all - t_prefill) / (n - 1)
    ids = torch.tensor([prompt], device="cuda")
    hf_kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generate(ids, max_new_tokens=4, **hf_kw)
    t1 = timed(lambda: hf.generate(ids, max_new_tokens=1, **hf_kw))
    tn = timed(lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **hf_kw))
    result["hf_decode_ms_per_token_bs1_ctx1k"] = 1e3 * (tn - t1) / (n - 1)
    active = active_bytes_per_token(path)
    bw = HBM_BYTES_PER_S["H200" if "H200" in gpu else "H100"]
    result["active_weight_bytes_per_token"] = active
    result["roofline_ms_per_token"] = 1e3 * active / bw
    result["engine_fraction_of_roofline"] = (result["roofline_ms_per_token"]
                                             / result["engine_decode_ms_per_token_bs1_ctx1k"])
    engine.shutdown()
    hf = None  # free the reference model before the next shape
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    report = {"gpu": gpu, "torch": torch.__version__, "results": []}
    with tempfile.TemporaryDirectory() as root:
        for arch, size in SHAPES:
            try:
                report["results"].append(check(arch, size, args.layers, Path(root), gpu))
            except Exception as e:  # keep the other shapes' figures
                report["results"].append({"arch": arch, "shape": size, "error": repr(e)})
            print(json.dumps(report["results"][-1]), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
