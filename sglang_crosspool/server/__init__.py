"""The HTTP server: SGLang's native API and the OpenAI API in front of the engine core.

    client --HTTP--> http_server (FastAPI/uvicorn: native_api, openai_api, tokenizers)
                        | request_manager: handles in flight, admission, metrics
                        | engine_client --ZeroMQ (messages.py, pickle)--> scheduler_process
                        |                                                   scheduler_loop
                        |                                                   EngineCore.step()
                     <- SSE/JSON <- per-request deltas (token ids, text, logprobs) <-

`launch.py` parses `server_args.py` and calls `http_server.run_server`. The in-process mode
(`engine_client.InProcessEngineClient`) runs the same scheduler loop in a thread, for tests.
"""
