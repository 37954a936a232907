"""Default expert placement over FFN servers, when no plan gives one (see the planner for a
placement that weighs bytes and expected load across models of different sizes)."""

from __future__ import annotations


def balanced_placement(num_experts: dict[str, int], servers: int) -> dict[str, list[list[int]]]:
    """model -> per server, the expert ids it owns. Experts of one model are equal in size,
    so dealing them round-robin, continuing across models, balances bytes and load."""
    placement, turn = {}, 0
    for model, count in num_experts.items():
        shares: list[list[int]] = [[] for _ in range(servers)]
        for expert in range(count):
            shares[turn % servers].append(expert)
            turn += 1
        placement[model] = shares
    return placement
