"""`Engine`: the synchronous in-process API, shaped like `sglang.Engine`.

    engine = Engine(model_path=[a, b], device="cpu", dtype="float32")
    engine.generate(prompt="Hi", sampling_params={"max_new_tokens": 8}, model="a")
"""

from __future__ import annotations

from sglang_crosspool.config import EngineConfig
from sglang_crosspool.engine.request import EngineRequest
from sglang_crosspool.engine.sampling_params import InvalidRequest, SamplingParams
from sglang_crosspool.engine.tensor_parallel import make_core


class Engine:
    def __init__(self, model_path, **options):
        self.config = EngineConfig.build(model_path, **options)
        self.core = make_core(self.config)  # rank 0 of a TP group under --tp-size

    @property
    def models(self) -> list[str]:
        return self.core.config.model_names  # the live set (load_model, unload_model)

    def load_model(self, model_path: str, served_model_name: str | None = None,
                   **args) -> dict:
        """Loads one more model and returns once it serves (what was loaded); raises
        ModelOpError (with its HTTP status) if it is refused or fails."""
        name = self.core.live.begin_load({"model_path": str(model_path),
                                          "served_model_name": served_model_name, **args})
        return self._finish_live(name)

    def unload_model(self, served_model_name: str) -> dict:
        """Frees a model (nothing runs between two calls here); returns what was freed."""
        name, _ = self.core.live.begin_unload({"served_model_name": served_model_name})
        return self._finish_live(name)

    def rebalance(self, placement: dict | None = None) -> dict:
        """Moves experts between FFN servers (crosspool): to `placement` ({model: shares}), or
        each model's spread evenly; returns what moved."""
        name = self.core.live.begin_rebalance({} if placement is None else
                                              {"placement": placement})
        if name is None:
            return {"models": {}}
        return self._finish_live(name)

    def _finish_live(self, name: str) -> dict:
        import time

        from sglang_crosspool.engine.live_models import ModelOpError

        while True:
            for _, model, result in self.core.live.poll():
                if model == name:
                    if "error" in result:
                        raise ModelOpError(result["status"], result["error"])
                    return result
            time.sleep(0.002)

    def tokenizer(self, model: str | None = None):
        return self.core.tokenizers[self._model(model)]

    def _model(self, model: str | None) -> str:
        if model is None:
            if len(self.models) > 1:
                raise InvalidRequest(
                    f"model: this engine serves several models ({', '.join(self.models)}); "
                    "name one")
            return self.models[0]
        self.core.check_model(model)
        return model

    def generate(self, prompt=None, sampling_params=None, input_ids=None, model=None,
                 return_logprob=False, logprob_start_len=-1, top_logprobs_num=0, rid=None):
        """One prompt (str or list of ids) -> dict; a list of prompts -> list of dicts.

        `sampling_params`, `model`, `return_logprob`, `logprob_start_len`, `top_logprobs_num`
        and `rid` may be one value for all prompts or a list with one value per prompt.
        """
        if (prompt is None) == (input_ids is None):
            raise InvalidRequest("give exactly one of prompt and input_ids")
        single = isinstance(prompt, str) or (
            input_ids is not None and (not input_ids or not isinstance(input_ids[0], list)))
        items = [prompt if prompt is not None else input_ids] if single else list(
            prompt if prompt is not None else input_ids)
        n_items = len(items)

        def per_item(value, name):
            if isinstance(value, list) and not (name == "rid" and single):
                if len(value) != n_items:
                    raise InvalidRequest(f"{name}: {len(value)} values for {n_items} prompts")
                return value
            return [value] * n_items

        models = [self._model(m) for m in per_item(model, "model")]
        params = [SamplingParams.from_dict(p) for p in per_item(sampling_params, "sampling_params")]
        rids = per_item(rid, "rid")
        requests = []
        for i, item in enumerate(items):
            ids = self._tokenize(item, models[i]) if isinstance(item, str) else list(item)
            for k in range(params[i].n):
                # n seeded samples: distinct yet reproducible (seed + k), as the server does
                sample_params = params[i].for_sample(k)
                request_id = rids[i] if rids[i] and params[i].n == 1 else (
                    f"{rids[i]}-{k}" if rids[i] else self.core.new_rid())
                requests.append(EngineRequest(
                    request_id, models[i], ids, sample_params,
                    return_logprob=_pick(return_logprob, i),
                    logprob_start_len=_pick(logprob_start_len, i),
                    top_logprobs_num=_pick(top_logprobs_num, i)))
        results = self._run(requests)
        return results[0] if single and len(results) == 1 else results

    def _tokenize(self, text: str, model: str) -> list[int]:
        return self.core.tokenizers[model].encode(text, add_special_tokens=False)

    def _run(self, requests: list[EngineRequest]) -> list[dict]:
        for req in requests:
            self.core.validate(req)  # all or nothing: no request is queued if one is bad
        states = []
        try:
            for req in requests:
                states.append(self.core.add_request(req))
            while any(not s.finished for s in states):
                self.core.step()
        except BaseException:
            for s in states:
                self.core.abort(s.req.rid, "the batch failed")
            raise
        return [s.result() for s in states]

    def stats(self) -> dict:
        return self.core.stats()

    def flush_cache(self) -> bool:
        """Empties every model's prefix cache (refused, False, while requests are in flight)."""
        return self.core.flush_cache()

    def shutdown(self) -> None:
        self.core.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _pick(value, i: int):
    return value[i] if isinstance(value, list) else value
