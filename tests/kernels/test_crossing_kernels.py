"""The crossing's kernels under the Triton interpreter, against their torch twins: peer stores
with per-row flags, bounded waits and the fused wait + sum + residual, with counters that only
grow across crossings."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from crosspool_kernels import crossing as k  # noqa: E402

T, H, K, ROWS = 3, 40, 4, 8


def areas():
    def i32(*shape):
        return torch.zeros(*shape, dtype=torch.int32)

    return {"h": torch.zeros(ROWS * H), "ids": torch.zeros(ROWS * K, dtype=torch.int64),
            "w": torch.zeros(ROWS * K), "flags": i32(ROWS), "sent": i32(ROWS),
            "received": i32(ROWS), "err": i32(4)}


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rows_cross_with_flags_that_only_grow(impl):
    send, wait = ((k.send_rows, k.wait_rows) if impl == "triton"
                  else (k.send_rows_ref, k.wait_rows_ref))
    a = areas()
    for crossing in range(1, 4):
        h, ids, w = torch.randn(T, H), torch.randint(0, 64, (T, K)), torch.rand(T, K)
        send(h, ids, w, a["h"], a["ids"], a["w"], a["flags"], a["sent"])
        assert a["flags"][:T].tolist() == [crossing] * T  # released with the sender's count
        assert a["flags"][T:].eq(0).all()  # rows past the batch are untouched
        wait(T, a["flags"], a["received"], a["err"], k.ERR_TIMEOUT, 10**9)
        assert a["received"][:T].tolist() == [crossing] * T and int(a["err"][0]) == 0
        assert torch.equal(a["h"][: T * H].view(T, H), h)
        assert torch.equal(a["ids"][: T * K].view(T, K), ids)
        assert torch.equal(a["w"][: T * K].view(T, K), w)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_a_wait_with_nothing_sent_times_out_and_names_itself(impl):
    wait = k.wait_rows if impl == "triton" else k.wait_rows_ref
    a = areas()
    wait(T, a["flags"], a["received"], a["err"], 7, timeout_ns=2 * 10**7, max_spins=200)
    assert int(a["err"][0]) == 7
    # Once the word is set every later wait returns at once and keeps the first code.
    wait(T, a["flags"], a["received"], a["err"], 9, timeout_ns=10**12, max_spins=10**9)
    assert int(a["err"][0]) == 7


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_a_receiver_that_times_out_tells_the_sender(impl):
    wait = k.wait_rows if impl == "triton" else k.wait_rows_ref
    a, peer_err = areas(), torch.zeros(4, dtype=torch.int32)
    wait(T, a["flags"], a["received"], a["err"], k.ERR_STALLED + 1, timeout_ns=2 * 10**7,
         max_spins=200, peer_err=peer_err)
    assert int(a["err"][0]) == int(peer_err[0]) == k.ERR_STALLED + 1


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("with_x", [True, False])
def test_wait_sum_adds_every_senders_rows_to_the_residual(impl, with_x):
    wait_sum = k.wait_sum if impl == "triton" else k.wait_sum_ref
    servers = 3
    parts = torch.randn(servers, ROWS * H)
    flags = torch.ones(servers, ROWS, dtype=torch.int32)
    counts = torch.zeros(servers, ROWS, dtype=torch.int32)
    err = torch.zeros(4, dtype=torch.int32)
    x = torch.randn(T, H) if with_x else None
    out = wait_sum(x, parts, torch.empty(T, H), flags, counts, err, T, H, 10**9)
    want = sum(parts[j, : T * H].view(T, H) for j in range(servers))
    if with_x:
        want = want + x
    torch.testing.assert_close(out, want)
    assert counts[:, :T].eq(1).all() and counts[:, T:].eq(0).all() and int(err[0]) == 0


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_wait_sum_names_the_sender_that_never_answered(impl):
    wait_sum = k.wait_sum if impl == "triton" else k.wait_sum_ref
    flags = torch.zeros(2, ROWS, dtype=torch.int32)
    flags[0, :T] = 1  # server 0 answered, server 1 did not
    err = torch.zeros(4, dtype=torch.int32)
    wait_sum(None, torch.zeros(2, ROWS * H), torch.empty(T, H), flags,
             torch.zeros(2, ROWS, dtype=torch.int32), err, T, H, timeout_ns=2 * 10**7,
             max_spins=200)
    assert int(err[0]) == k.ERR_PEER_BASE + 1
