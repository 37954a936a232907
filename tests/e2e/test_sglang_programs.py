"""SGLang's own frontend test programs, unmodified, from the installed `sglang` package
(`sglang.test.test_programs`), against a real server: the ones that use constrained decoding
(`regex`, and `dtype`, which the frontend turns into a regex). Each program runs on the
frontend's default backend, set to one model's base URL as a user would.

NOTE: test_decode_json_regex asserts that the JSON it builds parses, which needs the model to
close a `"[\\w\\d\\s]*"` string greedily within the frontend's default 128 tokens. That is the
model's doing, not the server's: the grammar only guarantees the string's characters. The tiny
random qwen2_moe checkpoint of seed 0 (the one of the conformance table in issue 20) closes
it; most random checkpoints loop inside the string, so that program runs on that one only.
"""

from __future__ import annotations

import pytest

from sglang_crosspool.testing.checkpoints import make_model

sgl = pytest.importorskip("sglang")
# It imports sglang.srt.utils (orjson, in requirements-server.txt).
programs = pytest.importorskip("sglang.test.test_programs")

CONSTRAINED = ["test_regex", "test_decode_json_regex", "test_dtype_gen"]
ANY_MODEL = ["test_regex", "test_dtype_gen"]  # their assertions hold for any model


@pytest.fixture(scope="module")
def qwen2_server(tmp_path_factory, launch_module_server):
    path = make_model(tmp_path_factory.mktemp("programs") / "qwen2", "qwen2_moe", seed=0)
    return launch_module_server({"qwen2": str(path)})


@pytest.fixture
def run_program():
    """Runs a program on the frontend's default backend; puts the previous backend back."""
    from sglang.global_config import global_config

    previous = global_config.default_backend

    def run(name: str, url: str):
        program = getattr(programs, name, None)
        if program is None:
            pytest.skip(f"the installed sglang has no {name}")
        sgl.set_default_backend(sgl.RuntimeEndpoint(url))
        program()

    yield run
    global_config.default_backend = previous


@pytest.mark.parametrize("name", CONSTRAINED)
def test_constrained_program(qwen2_server, run_program, name):
    run_program(name, f"{qwen2_server.url}/models/qwen2")


@pytest.mark.parametrize("model", ["qwen-a", "mixtral-b"])
@pytest.mark.parametrize("name", ANY_MODEL)
def test_constrained_program_on_other_models(server, run_program, name, model):
    run_program(name, f"{server.url}/models/{model}")
