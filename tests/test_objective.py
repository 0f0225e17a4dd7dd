"""The published MerMED objective against a loop-by-loop transcription of its equations, the KoLeo regulariser
against its direct formula, the memory's modality ids across real workers, and exact resumption."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run_ddp

from mermed.losses import KoLeoLoss, MerMEDLoss
from mermed.memory import MemoryQueue

K, DIM, BLOCK = 4096, 32, 1024


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_memory(masked: bool, seed: int = 0) -> MemoryQueue:
    """A random-start memory of modalities 0 and 1 plus exactly two rows of modality 2 (so that at least two
    blocks have none of it); with ``masked=False`` five random rows of unknown modality are left."""
    gen = seeded(seed)
    mem = MemoryQueue(size=K, dim=DIM, n_blocks=4, init="random", generator=gen)
    n = K if masked else K - 5
    ids = torch.randint(0, 2, (n,), generator=gen)
    ids[[7, n // 2]] = 2
    mem.enqueue(torch.randn(n, DIM, generator=gen), ids)
    assert bool((mem.modality >= 0).all()) is masked
    return mem


def make_inputs(n_views: int, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit student (all views) and teacher (global views) embeddings, and per-sample modalities that include
    2 (rare in the memory) and 3 (absent from it)."""
    gen = seeded(seed)
    student = F.normalize(torch.randn(n_views * batch, DIM, generator=gen), dim=-1).requires_grad_(True)
    teacher = F.normalize(torch.randn(2 * batch, DIM, generator=gen), dim=-1)
    ids = torch.tensor([2, 3, 0, 1, 0][:batch])
    return student, teacher, ids


def reference_blocks(ids, mem_ids, perm, block_size, masked) -> list[list[list[int]]]:
    """cols[b][c]: the memory columns that sample b sees in block c of the permutation."""
    blocks = [perm[c * block_size : (c + 1) * block_size].tolist() for c in range(len(perm) // block_size)]
    return [[[k for k in block if not masked or mem_ids[k] == ids[b]] for block in blocks] for b in range(len(ids))]


def softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max())
    return e / e.sum()


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return x - x.max() - torch.log(torch.exp(x - x.max()).sum())


def reference_loss(student, teacher, ids, mem: MemoryQueue, perm, n_global, block_size, ts, tt) -> torch.Tensor:
    """The objective as written, in float64: every (student view i, teacher view j != i), every row, every block
    its own full softmax over the columns the row may see; means over rows and blocks, then over pairs."""
    batch = teacher.shape[0] // n_global
    n_views = student.shape[0] // batch
    bank, mem_ids = mem.bank.double(), mem.modality.tolist()
    masked = min(mem_ids) >= 0
    cols = reference_blocks(ids.tolist(), mem_ids, perm, block_size, masked)
    pairs = []
    for i in range(n_views):
        for j in range(n_global):
            if i == j:
                continue
            terms = []
            for b in range(batch):
                for c in cols[b]:
                    if not c:  # no column of this modality in the block: contributes nothing, still counted
                        terms.append(torch.zeros((), dtype=torch.float64))
                        continue
                    q = softmax(teacher[j * batch + b].double() @ bank[c].T / tt)
                    log_p = log_softmax(student[i * batch + b] @ bank[c].T / ts)
                    terms.append(-(q * log_p).sum())
            pairs.append(torch.stack(terms).mean())
    return torch.stack(pairs).mean()


@pytest.mark.parametrize(
    ("n_views", "batch", "masked", "block_size"),
    [(2, 3, False, BLOCK), (2, 5, True, BLOCK), (12, 3, False, BLOCK), (12, 4, True, BLOCK), (4, 4, True, K)],
)
def test_loss_matches_the_transcribed_equations_in_value_and_gradient(n_views, batch, masked, block_size):
    mem = make_memory(masked)
    student, teacher, ids = make_inputs(n_views, batch)
    teacher.requires_grad_(True)
    loss_fn = MerMEDLoss(n_global=2, n_views=n_views, student_temp=0.1, block_size=block_size)
    before = (mem.bank.clone(), mem.modality.clone(), int(mem.ptr))
    ours = loss_fn(student, teacher, ids, mem, 0.04, generator=seeded(5))
    ref_student = student.detach().double().requires_grad_(True)
    perm = torch.randperm(K, generator=seeded(5))  # the permutation the loss drew
    ref = reference_loss(ref_student, teacher.detach(), ids, mem, perm, 2, block_size, 0.1, 0.04)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ours.backward()
    ref.backward()
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-7)
    assert teacher.grad is None  # the teacher side is a target
    assert torch.equal(mem.bank, before[0]) and torch.equal(mem.modality, before[1]) and int(mem.ptr) == before[2]


def test_masking_only_starts_once_no_slot_is_unknown():
    student, teacher, ids = make_inputs(2, 3)
    loss_fn = MerMEDLoss(2, 2, block_size=BLOCK)
    partial = make_memory(masked=False)
    full = make_memory(masked=False)
    full.enqueue(torch.randn(5, DIM), torch.zeros(5, dtype=torch.int64))  # the last five unknown slots
    perm = torch.randperm(K, generator=seeded(5))
    for mem, masked in ((partial, False), (full, True)):
        ours = loss_fn(student, teacher, ids, mem, 0.05, generator=seeded(5))
        ref = reference_loss(student.detach().double(), teacher, ids, mem, perm, 2, BLOCK, 0.1, 0.05)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        cols = reference_blocks(ids.tolist(), mem.modality.tolist(), perm, BLOCK, masked)
        assert (min(len(c) for c in cols[0]) < BLOCK) is masked


def test_partition_comes_from_the_generator_and_is_fp32_under_autocast():
    mem = make_memory(masked=True)
    student, teacher, ids = make_inputs(4, 3)
    loss_fn = MerMEDLoss(2, 4, block_size=BLOCK)
    a = loss_fn(student, teacher, ids, mem, 0.04, generator=seeded(1))
    gen = seeded(1)
    state = gen.get_state()
    b = loss_fn(student, teacher, ids, mem, 0.04, generator=gen)
    gen.set_state(state)  # a resumed generator repeats the partition
    c = loss_fn(student, teacher, ids, mem, 0.04, generator=gen)
    d = loss_fn(student, teacher, ids, mem, 0.04, generator=seeded(2))
    assert a.item() == b.item() == c.item() and d.item() != a.item()
    s16, t16 = student.detach().bfloat16(), teacher.bfloat16()
    ref = loss_fn(s16.float(), t16.float(), ids, mem, 0.04, generator=seeded(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(s16, t16, ids, mem, 0.04, generator=seeded(1))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_teacher_entropy_per_row_against_its_ceiling():
    mem = make_memory(masked=True)
    _, teacher, ids = make_inputs(2, 3)
    loss_fn = MerMEDLoss(2, 2, block_size=BLOCK)
    entropy, ceiling = loss_fn.teacher_entropy(teacher, ids, mem, 0.04, generator=seeded(3))
    cols = reference_blocks(ids.tolist(), mem.modality.tolist(), torch.randperm(K, generator=seeded(3)), BLOCK, True)
    bank = mem.bank.double()
    for j in range(2):
        for b in range(3):
            hs = []
            for c in cols[b]:
                q = softmax(teacher[j * 3 + b].double() @ bank[c].T / 0.04) if c else torch.ones(1)
                hs.append(-(q * q.log()).sum().item())
            assert entropy[j * 3 + b].item() == pytest.approx(sum(hs) / len(hs), rel=1e-4, abs=1e-6)
            expected = sum(math.log(len(c)) if c else 0.0 for c in cols[b]) / len(cols[b])
            assert ceiling[j * 3 + b].item() == pytest.approx(expected, rel=1e-6)
    assert ceiling[1].item() == 0.0  # sample 1 is of modality 3, which the memory does not hold
    flat, top = loss_fn.teacher_entropy(torch.zeros_like(teacher), ids, mem, 0.04, generator=seeded(3))
    torch.testing.assert_close(flat, top)  # a uniform teacher reaches the ceiling


def test_bad_inputs_are_rejected():
    mem = make_memory(masked=True)
    student, teacher, ids = make_inputs(2, 3)
    with pytest.raises(ValueError, match="init='random'"):
        MerMEDLoss(2, 2, block_size=BLOCK)(student, teacher, ids, MemoryQueue(K, DIM), 0.04)
    with pytest.raises(ValueError, match="must divide"):
        MerMEDLoss(2, 2, block_size=3000)(student, teacher, ids, mem, 0.04)
    with pytest.raises(ValueError, match="per sample"):
        MerMEDLoss(2, 2, block_size=BLOCK)(student, teacher, ids.repeat(2), mem, 0.04)
    with pytest.raises(ValueError, match="expected 4x3"):
        MerMEDLoss(2, 4, block_size=BLOCK)(student, teacher, ids, mem, 0.04)
    with pytest.raises(ValueError, match="pair of different views"):
        MerMEDLoss(1, 1)


def reference_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean_i log(min_{j != i} ||z_i - z_j + eps|| + eps) over unit rows, one row at a time."""
    z = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    terms = []
    for i in range(z.shape[0]):
        d = torch.stack([(z[i] - z[j] + eps).norm() for j in range(z.shape[0]) if j != i])
        terms.append(-torch.log(d.min() + eps))
    return torch.stack(terms).mean()


def test_koleo_matches_the_direct_formula_per_group():
    x = torch.randn(2 * 6, 8, generator=seeded(0), dtype=torch.float64).requires_grad_(True)
    ours = KoLeoLoss()(x.float(), n_groups=2)
    ref = (reference_koleo(x[:6]) + reference_koleo(x[6:])) / 2
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    x32 = x.detach().float().requires_grad_(True)
    KoLeoLoss()(x32, n_groups=2).backward()
    ref.backward()
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KoLeoLoss()(x32.bfloat16()).dtype == torch.float32


def test_koleo_is_finite_for_duplicates_and_rejects_lone_rows():
    x = torch.randn(4, 8).repeat(2, 1).requires_grad_(True)  # every row has an identical twin
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="at least two rows"):
        KoLeoLoss()(torch.randn(2, 8), n_groups=2)


def rows(start: int, n: int) -> torch.Tensor:
    """Rows [i + 1, 1, 0, 0] for i in start..start+n; x[0] / x[1] recovers i + 1 after normalisation."""
    x = torch.zeros(n, 4)
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float32) + 1
    x[:, 1] = 1.0
    return x


def _enqueue_worker(rank: int, world_size: int) -> tuple[list, list, int, int, dict]:
    mem = MemoryQueue(size=8, dim=4, n_blocks=2, init="random", generator=seeded(0))
    n = 2 + rank  # unequal row counts per worker
    mem.enqueue(rows(10 * rank, n), torch.full((n,), 20 + rank))
    # Rank 0 gives no ids, rank 1 does: both still run the same collectives.
    mem.enqueue(rows(100 + 10 * rank, n), None if rank == 0 else torch.full((n,), 22))
    seq = [round(float(r[0] / r[1])) for r in mem.bank]
    return seq, mem.modality.tolist(), int(mem.ptr), int(mem.filled), mem.modality_counts()


def test_enqueue_gathers_rows_and_modalities_from_every_worker():
    results = run_ddp(_enqueue_worker, 2)
    # Round 1 writes [1, 2 | 11, 12, 13] to slots 0-4; round 2 [101, 102 | 111, 112, 113] to slots 5-7, 0-1.
    expected = (
        [112, 113, 11, 12, 13, 101, 102, 111],
        [22, 22, 21, 21, 21, -1, -1, 22],
        2,
        8,
        {-1: 2, 21: 3, 22: 3},
    )
    assert results[0] == results[1] == expected


def test_memory_state_round_trips_and_resumes_the_same_loss():
    mem = make_memory(masked=True)
    mem.enqueue(torch.randn(1000, DIM), torch.randint(0, 3, (1000,)))  # wraps, pointer mid-way
    assert set(mem.state_dict()) == {"bank", "modality", "ptr", "filled"}
    other = MemoryQueue(size=K, dim=DIM, n_blocks=4, init="random", generator=seeded(99))
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.bank, mem.bank) and torch.equal(other.modality, mem.modality)
    assert int(other.ptr) == int(mem.ptr) == 1000 and int(other.filled) == K
    student, teacher, ids = make_inputs(4, 3)
    loss_fn = MerMEDLoss(2, 4, block_size=BLOCK)
    a = loss_fn(student, teacher, ids, mem, 0.05, generator=seeded(4))
    assert loss_fn(student, teacher, ids, other, 0.05, generator=seeded(4)).item() == a.item()
    new, new_ids = torch.randn(7, DIM), torch.randint(0, 3, (7,))
    mem.enqueue(new, new_ids)
    other.enqueue(new, new_ids)
    assert torch.equal(other.bank, mem.bank) and torch.equal(other.modality, mem.modality)
    assert int(other.ptr) == int(mem.ptr)
