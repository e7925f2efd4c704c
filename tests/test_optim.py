"""The flat optimizers follow torch.optim's arithmetic step for step, and round-trip their state."""
import pytest
import torch

from p2prl.sync.optim import FlatAdam, FlatRMSprop


def _start_and_grads(n_steps: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, generator=g), [torch.randn(50, generator=g) * (1 + i) for i in range(n_steps)]


def _steps(opt, p, grads, halve_lr_at: int = 5):
    for i, grad in enumerate(grads):
        p.grad = grad
        if i == halve_lr_at:
            opt.param_groups[0]["lr"] *= 0.5  # how the learner anneals
        opt.step()


@pytest.mark.parametrize("ours, theirs", [
    (lambda p: FlatAdam(p, lr=1e-2, eps=1e-5), lambda p: torch.optim.Adam([p], lr=1e-2, eps=1e-5)),
    (lambda p: FlatAdam(p, lr=3e-3), lambda p: torch.optim.Adam([p], lr=3e-3)),
    (lambda p: FlatRMSprop(p, lr=1e-2, alpha=0.99, eps=1e-5),
     lambda p: torch.optim.RMSprop([p], lr=1e-2, alpha=0.99, eps=1e-5)),
])
def test_matches_torch_optim(ours, theirs):
    start, grads = _start_and_grads(30)
    mine, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    _steps(ours(mine), mine, grads)
    _steps(theirs(ref), ref, grads)
    assert (mine.detach() - start).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(mine.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_fused_adam_is_torch_optims_fused_adam_and_adam_to_rounding():
    start, grads = _start_and_grads(30)
    fused, ref, plain = (torch.nn.Parameter(start.clone()) for _ in range(3))
    _steps(FlatAdam(fused, lr=1e-2, eps=1e-5, fused=True), fused, grads)
    _steps(torch.optim.Adam([ref], lr=1e-2, eps=1e-5, fused=True), ref, grads)
    _steps(FlatAdam(plain, lr=1e-2, eps=1e-5), plain, grads)
    assert (fused.detach() - start).abs().max() > 1e-2  # it moved
    assert torch.equal(fused.detach(), ref.detach())
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=1e-6, atol=1e-7)


def test_state_dict_resumes_exactly():
    start, grads = _start_and_grads(20)
    full = torch.nn.Parameter(start.clone())
    _steps(FlatAdam(full, lr=1e-2), full, grads)

    first = torch.nn.Parameter(start.clone())
    opt = FlatAdam(first, lr=1e-2)
    _steps(opt, first, grads[:10])
    second = torch.nn.Parameter(first.detach().clone())
    resumed = FlatAdam(second, lr=1.0)  # lr comes from the saved state
    resumed.load_state_dict(opt.state_dict())
    _steps(resumed, second, grads[10:], halve_lr_at=-1)
    assert torch.equal(second.detach(), full.detach())


def test_groups_step_as_separate_optimizers_and_skipped_ones_not_at_all():
    """Segments with their own learning rates; a skipped segment keeps its parameters, moments and step
    count, so it follows an optimizer stepped only on the other updates (TD3's delayed actor)."""
    start, grads = _start_and_grads(12)
    flat = torch.nn.Parameter(start.clone())
    opt = FlatAdam(flat, lr=0.0, groups=[("actor", 20, 1e-2), ("critics", 29, 3e-3), ("alpha", 1, 3e-3)])
    actor, rest = torch.nn.Parameter(start[:20].clone()), torch.nn.Parameter(start[20:].clone())
    ref_actor, ref_rest = torch.optim.Adam([actor], lr=1e-2), torch.optim.Adam([rest], lr=3e-3)
    for i, grad in enumerate(grads):
        flat.grad, actor.grad, rest.grad = grad, grad[:20].clone(), grad[20:].clone()
        skip = ("actor",) if i % 2 == 0 else ()
        held = flat.detach()[:20].clone(), opt.exp_avg[:20].clone()
        opt.step(skip=skip)
        if skip:
            assert torch.equal(flat.detach()[:20], held[0]) and torch.equal(opt.exp_avg[:20], held[1])
        else:
            ref_actor.step()
        ref_rest.step()
    torch.testing.assert_close(flat.detach()[:20], actor.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat.detach()[20:], rest.detach(), rtol=1e-6, atol=1e-7)
    assert [g["step"] for g in opt.param_groups] == [6, 12, 12]
    resumed = FlatAdam(torch.nn.Parameter(flat.detach().clone()), lr=0.0,
                       groups=[("actor", 20, 0.0), ("critics", 29, 0.0), ("alpha", 1, 0.0)])
    resumed.load_state_dict(opt.state_dict())
    assert [(g["step"], g["lr"]) for g in resumed.param_groups] == [(6, 1e-2), (12, 3e-3), (12, 3e-3)]
    assert torch.equal(resumed.exp_avg_sq, opt.exp_avg_sq)


def test_a_state_saved_before_groups_existed_loads():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FlatAdam(p, lr=1.0)
    opt.load_state_dict({"step": 7, "lr": 0.5, "exp_avg": torch.ones(4), "exp_avg_sq": torch.ones(4)})
    assert opt.step_count == 7 and opt.param_groups[0]["lr"] == 0.5 and torch.equal(opt.exp_avg, torch.ones(4))
