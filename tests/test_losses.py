"""DINO loss against the reference formula, the memory alignment loss against a direct full-softmax version."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mermed.losses import DINOLoss, MemoryAlignmentLoss
from mermed.memory import MemoryQueue


def reference_dino_loss(student_output, teacher_output, center, temp, ncrops, student_temp=0.1, momentum=0.9):
    """DINOLoss.forward + update_center of facebookresearch/dino (main_dino.py), single process."""
    student_out = student_output / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total_loss, center * momentum + batch_center * (1 - momentum)


@pytest.mark.parametrize(("n_views", "batch", "k"), [(12, 3, 64), (4, 5, 17), (2, 1, 8)])
def test_dino_loss_matches_the_reference(n_views, batch, k):
    gen = torch.Generator().manual_seed(n_views)
    loss_fn = DINOLoss(k, n_global=2, n_views=n_views)
    center = torch.zeros(1, k)
    for step, temp in enumerate((0.04, 0.055, 0.07)):  # three steps, so that a non-zero centre is used
        student = torch.randn(n_views * batch, k, generator=gen, requires_grad=True)
        teacher = torch.randn(2 * batch, k, generator=gen) * 3
        ref_student = student.detach().clone().requires_grad_(True)
        ref, center = reference_dino_loss(ref_student, teacher, center, temp, n_views)
        ours = loss_fn(student, teacher, temp)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        torch.testing.assert_close(loss_fn.center, center, rtol=1e-5, atol=1e-7)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-4, atol=1e-7)


def test_dino_loss_two_views_by_hand():
    # K = 2, one sample, two global views, student_temp = 1, teacher_temp = 1, centre 0.
    loss_fn = DINOLoss(2, n_global=2, n_views=2, student_temp=1.0, center_momentum=0.5)
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax: [1/2, 1/2] and [3/4, 1/4]
    student = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0]])  # softmax: [4/5, 1/5] and [1/2, 1/2]
    # Pairs: teacher view 0 with student view 1, teacher view 1 with student view 0.
    ce_01 = -(0.5 * math.log(0.5) + 0.5 * math.log(0.5))
    ce_10 = -(0.75 * math.log(0.8) + 0.25 * math.log(0.2))
    loss = loss_fn(student, teacher, 1.0)
    assert loss.item() == pytest.approx((ce_01 + ce_10) / 2, rel=1e-6)
    # Centre: 0.5 * 0 + 0.5 * mean of the teacher rows.
    torch.testing.assert_close(loss_fn.center, torch.tensor([[math.log(3.0) / 4, 0.0]]))
    # The centred teacher of the next step: ([0, 0] - c) / 1 -> softmax computed with the new centre.
    probs = loss_fn.teacher_probs(teacher[:1], 1.0)
    torch.testing.assert_close(probs, F.softmax(-loss_fn.center, dim=-1))


def test_dino_loss_is_fp32_under_autocast_and_center_is_state():
    loss_fn = DINOLoss(32, n_global=2, n_views=3)
    s, t = torch.randn(9, 32).bfloat16(), torch.randn(6, 32).bfloat16()
    ref = DINOLoss(32, n_global=2, n_views=3)(s.float(), t.float(), 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(s, t, 0.04)
    # Same value as fp32 on the same (bf16) inputs: nothing inside ran in bf16.
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert set(loss_fn.state_dict()) == {"center"}
    with pytest.raises(ValueError, match="not a multiple"):
        loss_fn(torch.randn(10, 32), t, 0.04)


def _center_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss_fn = DINOLoss(3, n_global=2, n_views=2, center_momentum=0.0)
        teacher = torch.full((2, 3), float(rank)) + torch.tensor([0.0, 1.0, 2.0])
        loss_fn(torch.zeros(2, 3), teacher, 0.04)
        results[rank] = loss_fn.center.tolist()
    finally:
        dist.destroy_process_group()


def test_center_is_averaged_over_all_workers(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_center_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    # Rank 0 rows are [0, 1, 2], rank 1 rows [1, 2, 3]: the global mean is [0.5, 1.5, 2.5] on both.
    assert results[0] == results[1] == [[0.5, 1.5, 2.5]]


def reference_memory_loss(student, teacher, bank, n_global, ts, tt):
    """The memory term written directly: full softmaxes over the whole bank, one pair at a time."""
    batch = teacher.shape[0] // n_global
    s_views, t_views = student.chunk(student.shape[0] // batch), teacher.chunk(n_global)
    terms = []
    for g, t in enumerate(t_views):
        q = F.softmax(t @ bank.T / tt, dim=-1)
        for v, s in enumerate(s_views):
            if v != g:
                terms.append(-(q * F.log_softmax(s @ bank.T / ts, dim=-1)).sum(-1).mean())
    return torch.stack(terms).mean()


def test_memory_loss_blockwise_equals_full_softmax_in_value_and_gradient():
    torch.manual_seed(0)
    mem = MemoryQueue(size=32, dim=8, n_blocks=4)
    mem.enqueue(torch.randn(27, 8))  # three full blocks and a partial one
    student = F.normalize(torch.randn(4 * 3, 8), dim=-1).requires_grad_(True)
    teacher = F.normalize(torch.randn(2 * 3, 8), dim=-1).requires_grad_(True)
    loss_fn = MemoryAlignmentLoss(student_temp=0.1, teacher_temp=0.05, n_global=2)
    ours = loss_fn(student, teacher, mem)
    ref_student = student.detach().clone().requires_grad_(True)
    ref = reference_memory_loss(ref_student, teacher.detach(), mem.bank[:27], 2, 0.1, 0.05)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-4, atol=1e-6)
    assert teacher.grad is None  # the teacher side is a target, never trained through


def test_memory_loss_is_stable_for_sharp_temperatures():
    torch.manual_seed(1)
    mem = MemoryQueue(size=16, dim=4, n_blocks=2)
    mem.enqueue(torch.randn(16, 4))
    s, t = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(4, 4), dim=-1)
    sharp = MemoryAlignmentLoss(student_temp=1e-3, teacher_temp=1e-3, n_global=2)(s, t, mem)  # logits ~1000
    assert torch.isfinite(sharp)
    torch.testing.assert_close(
        sharp, reference_memory_loss(s.double(), t.double(), mem.bank.double(), 2, 1e-3, 1e-3).float()
    )


def test_memory_loss_is_zero_without_memory():
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(4, 4)
    loss_fn = MemoryAlignmentLoss(n_global=2)
    assert loss_fn(s, t, MemoryQueue(size=0, dim=4, n_blocks=4)).item() == 0.0
    assert loss_fn(s, t, MemoryQueue(size=8, dim=4, n_blocks=2)).item() == 0.0  # nothing enqueued yet
