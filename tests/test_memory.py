"""The FIFO memory: order, wrap-around, no skipped slots, modality ids, the random start, checkpointing, and
gathering across real workers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mermed.memory import MemoryQueue


def rows(start: int, n: int, dim: int = 4) -> torch.Tensor:
    """Rows [i + 1, 1, 0, ...] for i in start..start+n: after normalisation, x[0] / x[1] still gives i + 1."""
    x = torch.zeros(n, dim)
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float32) + 1
    x[:, 1] = 1.0
    return x


def ids(mem: MemoryQueue) -> list[int]:
    """Sequence numbers held in each slot (0 for empty), decoded from the normalised rows."""
    b = mem.bank
    return [int(round(float(r[0] / r[1]))) if r[1] > 0 else 0 for r in b]


def test_fills_in_order_then_wraps_without_skipping():
    mem = MemoryQueue(size=8, dim=4, n_blocks=2)
    assert mem.enqueue(rows(0, 3)) == 3
    assert ids(mem) == [1, 2, 3, 0, 0, 0, 0, 0] and int(mem.ptr) == 3 and int(mem.filled) == 3
    mem.enqueue(rows(3, 3))
    assert ids(mem)[:6] == [1, 2, 3, 4, 5, 6] and int(mem.ptr) == 6
    mem.enqueue(rows(6, 3))  # 3 rows do not divide 8: two at the end, one wraps to slot 0
    assert ids(mem) == [9, 2, 3, 4, 5, 6, 7, 8] and int(mem.ptr) == 1 and int(mem.filled) == 8
    mem.enqueue(rows(9, 5))
    assert ids(mem) == [9, 10, 11, 12, 13, 14, 7, 8] and int(mem.ptr) == 6


def test_every_slot_is_written_with_uneven_batches():
    mem = MemoryQueue(size=12, dim=4, n_blocks=3)
    written = 0
    for n in (5, 7, 3, 5, 1, 4):
        mem.enqueue(rows(written, n))
        written += n
    # The newest 12 of 25 rows, each exactly once, the oldest at ptr.
    held = ids(mem)
    assert sorted(held) == list(range(written - 11, written + 1))
    ptr = int(mem.ptr)
    assert ptr == written % 12 and held[ptr:] + held[:ptr] == list(range(written - 11, written + 1))


def test_batch_larger_than_memory_keeps_the_newest_rows():
    mem = MemoryQueue(size=4, dim=4, n_blocks=2)
    mem.enqueue(rows(0, 1))
    mem.enqueue(rows(1, 10))
    held = ids(mem)
    ptr = int(mem.ptr)
    # Only the newest 4 are written, starting at the pointer, which therefore comes back to where it was.
    assert held[ptr:] + held[:ptr] == [8, 9, 10, 11] and ptr == 1


def test_rows_are_normalised_and_blocks_cover_only_filled_rows():
    mem = MemoryQueue(size=8, dim=4, n_blocks=2)
    assert list(mem.blocks()) == []
    mem.enqueue(torch.randn(5, 4) * 3)
    blocks = list(mem.blocks())
    assert [b.shape[0] for b in blocks] == [4, 1]
    assert blocks[0].data_ptr() == mem.bank.data_ptr()  # views, not copies
    torch.testing.assert_close(torch.cat(blocks).norm(dim=1), torch.ones(5))
    assert mem.fill_fraction == 5 / 8


def test_state_dict_roundtrip_restores_contents_and_pointer():
    mem = MemoryQueue(size=6, dim=4, n_blocks=3)
    mem.enqueue(torch.randn(4, 4))
    mem.enqueue(torch.randn(3, 4))
    state = mem.state_dict()
    assert set(state) == {"bank", "modality", "ptr", "filled"}
    other = MemoryQueue(size=6, dim=4, n_blocks=3)
    other.load_state_dict(state)
    assert torch.equal(other.bank, mem.bank) and int(other.ptr) == 1 and int(other.filled) == 6
    assert torch.equal(other.modality, mem.modality)
    new = torch.randn(3, 4)
    mem.enqueue(new)
    other.enqueue(new)
    assert torch.equal(other.bank, mem.bank) and int(other.ptr) == int(mem.ptr)


def test_size_zero_is_a_noop_and_bad_input_is_rejected():
    mem = MemoryQueue(size=0, dim=4, n_blocks=4)
    assert mem.enqueue(torch.randn(3, 4)) == 0 and list(mem.blocks()) == [] and mem.fill_fraction == 0.0
    with pytest.raises(ValueError, match="enqueue expects"):
        MemoryQueue(size=8, dim=4, n_blocks=2).enqueue(torch.randn(3, 5))
    with pytest.raises(ValueError, match="n_blocks must divide size"):
        MemoryQueue(size=10, dim=4, n_blocks=4)


def test_modality_ids_follow_their_rows_through_wrap_around():
    mem = MemoryQueue(size=8, dim=4, n_blocks=2)
    written = 0
    for n in (3, 3, 3, 5):
        mem.enqueue(rows(written, n), torch.arange(written, written + n) + 1)  # id = sequence number
        written += n
    assert mem.modality.tolist() == ids(mem) == [9, 10, 11, 12, 13, 14, 7, 8]
    mem.enqueue(rows(written, 2))  # no ids: unknown
    assert mem.modality.tolist() == [9, 10, 11, 12, 13, 14, -1, -1] and int(mem.ptr) == 0
    mem.enqueue(rows(100, 10), torch.arange(10))  # more rows than slots: the newest rows keep their own ids
    assert [m + 101 for m in mem.modality.tolist()] == ids(mem)


def test_modality_counts_cover_only_filled_slots():
    mem = MemoryQueue(size=8, dim=4, n_blocks=2)
    assert mem.modality_counts() == {}
    mem.enqueue(torch.randn(3, 4), torch.tensor([2, 0, 2]))
    mem.enqueue(torch.randn(1, 4))
    assert mem.modality_counts() == {-1: 1, 0: 1, 2: 2}


def test_random_start_is_full_of_unit_vectors_of_unknown_modality():
    mem = MemoryQueue(size=8, dim=4, n_blocks=2, init="random", generator=torch.Generator().manual_seed(0))
    again = MemoryQueue(size=8, dim=4, n_blocks=2, init="random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(mem.bank, again.bank)  # seeded: reproducible
    torch.testing.assert_close(mem.bank.norm(dim=1), torch.ones(8))
    assert mem.modality.tolist() == [-1] * 8 and mem.modality.dtype == torch.int64
    assert int(mem.filled) == 8 and mem.fill_fraction == 1.0 and int(mem.ptr) == 0
    assert [b.shape[0] for b in mem.blocks()] == [4, 4] and mem.modality_counts() == {-1: 8}
    start = mem.bank.clone()
    mem.enqueue(rows(0, 3), torch.tensor([5, 5, 6]))  # overwrites from slot 0, the rest stays random
    assert ids(mem)[:3] == [1, 2, 3] and torch.equal(mem.bank[3:], start[3:])
    assert mem.modality_counts() == {-1: 5, 5: 2, 6: 1} and int(mem.ptr) == 3 and int(mem.filled) == 8
    assert "init=random" in repr(mem)


def test_bad_modality_ids_and_init_are_rejected():
    mem = MemoryQueue(size=8, dim=4, n_blocks=2)
    with pytest.raises(ValueError, match="modality ids"):
        mem.enqueue(torch.randn(3, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="memory init"):
        MemoryQueue(size=8, dim=4, n_blocks=2, init="zeros")  # type: ignore[arg-type]


def _gather_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mem = MemoryQueue(size=8, dim=4, n_blocks=2)
        # Rank 0 contributes 2 rows, rank 1 three: the gather must handle unequal counts.
        mem.enqueue(rows(10 * rank, 2 + rank))
        mem.enqueue(rows(100 + 10 * rank, 2 + rank))
        results[rank] = (ids(mem), int(mem.ptr), int(mem.filled), mem.modality.tolist())
    finally:
        dist.destroy_process_group()


def test_enqueue_gathers_from_every_worker_in_rank_order(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    # Round 1 gathers [1, 2 | 11, 12, 13] into slots 0-4; round 2 gathers [101, 102 | 111, 112, 113]: three
    # fill slots 5-7 and two wrap to slots 0-1. Both ranks hold the same memory.
    expected = ([112, 113, 11, 12, 13, 101, 102, 111], 2, 8, [-1] * 8)  # no ids given: all unknown
    assert results[0] == expected and results[1] == expected
