"""Command line around ``sglang_crosspool.testing.checkpoints.make_model``.

In: an architecture and size (or ``--all`` for the four tiny models), an output folder and save
options. Out: Hugging Face checkpoint folders with random weights; one line per model on stdout
with its path and the seconds it took. With ``--config-only``: a folder holding a given
config.json and the test tokenizer but no weights, served with ``--load-format dummy``.

    python scripts/make_test_models.py --arch qwen3_moe --size tiny --out /tmp/m
    python scripts/make_test_models.py --all --out /tmp/tiny          # /tmp/tiny/<arch>
    python scripts/make_test_models.py --arch deepseek_v2 --out /tmp/ds   # MLA, CPU only so far
    python scripts/make_test_models.py --arch qwen3_moe --size qwen3-30b-a3b --out /tmp/q \
        --dtype bfloat16 --device cuda --shards 8 --override num_hidden_layers=4
    python scripts/make_test_models.py --config-only --out /tmp/q30 \
        --from-config tests/data/model-configs/Qwen3-30B-A3B/config.json [--layers 8]

Importable as well: ``from scripts.make_test_models import make_model`` or, with scripts/ on
sys.path, ``import make_test_models``.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # lets the script run without installing the package
    sys.path.insert(0, str(_REPO_ROOT))

from sglang_crosspool.testing.checkpoints import (  # noqa: E402
    ALL_ARCHS,
    ARCHS,
    SIZES,
    make_config_only,
    make_model,
)

__all__ = ["ARCHS", "SIZES", "main", "make_config_only", "make_model"]


def _parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as a Python literal when it is one (3, 1e-5, None, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"override must be KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=ALL_ARCHS)
    p.add_argument("--size", default="tiny", choices=tuple(SIZES))
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--all", action="store_true", help="the four tiny models under OUT/<arch>")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors shards")
    p.add_argument("--layout", default="per_expert", choices=("per_expert", "fused"))
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="where weights are initialised (cuda: fast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        type=_parse_override,
        metavar="KEY=VALUE",
        help="config field override, repeatable (e.g. num_hidden_layers=1)",
    )
    g = p.add_argument_group("config only (for --load-format dummy)")
    g.add_argument("--config-only", action="store_true",
                   help="write --from-config's config.json and the tokenizer, no weights")
    g.add_argument("--from-config", type=Path, metavar="PATH",
                   help="a real config.json (or its folder), e.g. under tests/data/model-configs")
    g.add_argument("--layers", type=int, metavar="N", help="num_hidden_layers to write")
    return p


def _jobs(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    if args.all:
        return [(arch, "tiny", args.out / arch) for arch in ARCHS]
    return [(args.arch, args.size, args.out)]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config_only:
        if args.from_config is None:
            parser.error("--config-only needs --from-config")
        start = time.perf_counter()
        path = make_config_only(args.out, args.from_config, num_hidden_layers=args.layers,
                                **dict(args.override))
        print(f"{path}\tconfig-only\t{args.from_config}\t{time.perf_counter() - start:.2f}s",
              flush=True)
        return 0
    if args.from_config is not None or args.layers is not None:
        parser.error("--from-config and --layers go with --config-only")
    if not args.all and args.arch is None:
        parser.error("--arch is required unless --all is given")
    for arch, size, out in _jobs(args):
        start = time.perf_counter()
        path = make_model(
            out,
            arch,
            size=size,
            seed=args.seed,
            dtype=args.dtype,
            num_shards=args.shards,
            expert_layout=args.layout,
            vocab_size=args.vocab_size,
            device=args.device,
            **dict(args.override),
        )
        print(f"{path}\t{arch}\t{size}\t{time.perf_counter() - start:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
