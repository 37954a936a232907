"""Transports: how hidden states cross between the KV-cache pool and the weights pool.

In (attention side): per layer and micro-batch, hidden states [T, H] with top-k expert ids and
weights. Out: the FFN server's partial FFN output [T, H]. One `Link` joins the attention worker
to one FFN server; the FFN server holds the matching `Endpoint`.

- `shm`: processes on one host: data through shared memory, a small ZeroMQ doorbell per
  crossing (no tensor bytes on the socket). On GPUs it stages device -> host -> device.
- `cuda-ipc`: processes on GPUs of one host: device buffers shared once by CUDA IPC, per
  crossing a device copy, an interprocess CUDA event and the ZeroMQ doorbell; no host sync.
- `dist`: torch.distributed send/recv (gloo on CPU, nccl on GPU); the path across hosts.
  `nccl` is the same link with the nccl backend forced (GPU to GPU; needs distinct GPUs).
- in-process: `sglang_crosspool.ffn.executor.LocalFFNExecutor`, no transport at all.
Control (which model, which layer, how many tokens) rides on the doorbell message.
"""
