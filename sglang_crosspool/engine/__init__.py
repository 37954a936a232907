"""The engine: turns tokenized requests into tokens, for many models at once.

In: `EngineRequest`s (token ids, model name, sampling params). Out: per-step `TokenEvent`s and
finished results. `EngineCore` owns the models' attention halves, the KV pool, an FFN executor
and the global scheduler; `Engine` is the synchronous in-process API shaped like sglang.Engine.
"""
