"""Runs programs of SGLang's `sglang.test.test_programs`, unmodified, as a user would: each on
the frontend's default backend, set to `sgl.RuntimeEndpoint(url)`.

    python run_sglang_programs.py '[{"url": ..., "name": "test_select",
                                     "kwargs": {"check_answer": false}}, ...]'

Out, on stdout, per program: `START <name> <url>` before it runs, then `RESULT <json>` with
`ok` and, on failure, the traceback as `error`. Run by tests/e2e/test_sglang_programs.py in its
own process, with the frontend under test first on PYTHONPATH; it imports nothing from this
project.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def main(specs: list[dict]) -> None:
    import sglang as sgl
    import sglang.test.test_programs as programs

    print(f"SGLANG {sgl.__version__} {sgl.__file__}", flush=True)
    backends = {}
    for spec in specs:
        url, name = spec["url"], spec["name"]
        print(f"START {name} {url}", flush=True)
        t0 = time.monotonic()
        result = {"url": url, "name": name, "ok": True}
        try:
            if url not in backends:
                backends[url] = sgl.RuntimeEndpoint(url)
            sgl.set_default_backend(backends[url])
            getattr(programs, name)(**spec.get("kwargs", {}))
        except Exception:  # an assertion, an HTTP error, anything: reported, then go on
            result.update(ok=False, error=traceback.format_exc())
        result["seconds"] = round(time.monotonic() - t0, 2)
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
