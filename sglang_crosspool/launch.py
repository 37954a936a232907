"""`python -m sglang_crosspool.launch [flags]`: serve models over SGLang's and OpenAI's APIs.

In: SGLang's launch flags (see `--help`), or none to serve the built-in demo models.
Out: an HTTP server on --host:--port until SIGTERM or Ctrl-C (requests in flight get
--shutdown-timeout seconds, then exit code 0); exit code 1 if the scheduler process dies.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from sglang_crosspool.server_args import ServerArgs

    args = ServerArgs.from_cli(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("sglang_crosspool.launch")
    if args.demo_models:
        logger.info("no model given: serving the built-in demo models (%s)",
                    ", ".join(args.model_names))
    from sglang_crosspool.server.engine_client import SchedulerStartError
    from sglang_crosspool.server.http_server import run_server

    try:
        return run_server(args)
    except SchedulerStartError as e:
        logger.critical("%s", e)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
