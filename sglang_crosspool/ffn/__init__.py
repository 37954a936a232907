"""FFN halves of the models and the executors that run them.

In: per layer, hidden states plus top-k expert ids and weights from the attention side.
Out: the FFN output (routed experts weighted and summed, plus the shared expert), to be added
to the residual stream. The in-process executor calls the FFN half directly; remote FFN
servers (the weights pool) implement the same `FFNExecutor` contract.
"""
