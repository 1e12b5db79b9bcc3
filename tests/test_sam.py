import pytest
import torch
from torch import nn

from robustq.sam import DEFAULT_RHO, SAM, make_sam


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _sam_step(sam, model, batch):
    """The training loop's fixed protocol."""
    _loss(model, batch).backward()
    sam.first_step()
    sam.zero_grad()
    _loss(model, batch).backward()
    sam.second_step()


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_first_then_second_step_with_zero_lr_restores_exact_weights(kind):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    sam = make_sam(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.0), kind)
    batch = _batch()
    _loss(model, batch).backward()
    sam.first_step()
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    sam.zero_grad()
    _loss(model, batch).backward()
    sam.second_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_sam_perturbation_has_norm_rho_along_gradient():
    model = tiny_model()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.07)
    _loss(model, _batch()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    sam.first_step()
    eps = [sam.perturbations[p] for p in model.parameters()]
    total = torch.sqrt(sum((e**2).sum() for e in eps))
    assert total.item() == pytest.approx(0.07, rel=1e-5)
    grad_norm = torch.sqrt(sum((g**2).sum() for g in grads))
    for e, g, p, b in zip(eps, grads, model.parameters(), before):
        assert torch.allclose(e, 0.07 * g / grad_norm, atol=1e-7)
        assert torch.allclose(p, b + e)


def test_asam_perturbation_matches_formula_on_tiny_tensors():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    w.grad = torch.tensor([0.4, 0.1, -1.0, 2.0], dtype=torch.float64)
    b.grad = torch.tensor([-0.5], dtype=torch.float64)
    sam = SAM([w, b], torch.optim.SGD([w, b], lr=0.1), rho=0.5, adaptive=True, eta=0.01)
    t_w, t_b = w.detach().abs() + 0.01, torch.tensor([0.31], dtype=torch.float64)
    sam.first_step()
    norm = torch.sqrt(((t_w * w.grad) ** 2).sum() + ((t_b * b.grad) ** 2).sum())
    assert torch.allclose(sam.perturbations[w], 0.5 * t_w**2 * w.grad / norm)
    assert torch.allclose(sam.perturbations[b], 0.5 * t_b**2 * b.grad / norm)
    start = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert torch.allclose(w.detach(), start + sam.perturbations[w])


def test_sam_step_on_quadratic_uses_perturbed_gradient_and_moves_to_minimum():
    curvature = torch.tensor([1.0, 10.0], dtype=torch.float64)
    minimum = torch.tensor([1.0, -1.0], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([3.0, 2.0], dtype=torch.float64))

    def quadratic():
        return 0.5 * (curvature * (w - minimum) ** 2).sum()

    sam = SAM([w], torch.optim.SGD([w], lr=0.05), rho=0.1)
    start = w.detach().clone()
    quadratic().backward()
    g = w.grad.clone()
    sam.first_step()
    sam.zero_grad()
    quadratic().backward()
    sam.second_step()
    perturbed = start + 0.1 * g / g.norm()
    assert torch.allclose(w.detach(), start - 0.05 * curvature * (perturbed - minimum))
    assert (w.detach() - minimum).norm() < (start - minimum).norm()


def test_params_without_grad_are_skipped():
    model = tiny_model()
    unused = nn.Parameter(torch.ones(3))
    params = list(model.parameters()) + [unused]
    sam = SAM(params, torch.optim.SGD(params, lr=0.1))
    _sam_step(sam, model, _batch())
    assert unused not in sam.perturbations
    assert torch.equal(unused.detach(), torch.ones(3))


def test_delegates_param_groups_state_dict_and_scheduler():
    model = tiny_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sam = make_sam(model.parameters(), base, "asam")
    assert sam.param_groups is base.param_groups
    scheduler = torch.optim.lr_scheduler.OneCycleLR(sam.base_optimizer, max_lr=0.5, total_steps=10)
    for _ in range(3):
        _sam_step(sam, model, _batch())
        scheduler.step()
    assert sam.param_groups[0]["lr"] == base.param_groups[0]["lr"] != 0.1
    state = sam.state_dict()
    assert state["state"] and state == base.state_dict()
    fresh_model = tiny_model()
    fresh_base = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9)
    fresh = make_sam(fresh_model.parameters(), fresh_base)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == sam.param_groups[0]["lr"]
    loaded = fresh.base_optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(loaded, state["state"][0]["momentum_buffer"])


def test_zero_grad_delegates():
    model = tiny_model()
    sam = make_sam(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    _loss(model, _batch()).backward()
    sam.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_training_with_sam_reduces_loss():
    model = tiny_model()
    sam = make_sam(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.5), "sam")
    batch = _batch()
    start = _loss(model, batch).item()
    for _ in range(20):
        sam.zero_grad()
        _sam_step(sam, model, batch)
    assert _loss(model, batch).item() < 0.8 * start


def test_defaults():
    model = tiny_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    assert DEFAULT_RHO == {"sam": 0.05, "asam": 0.5}
    sam, asam = make_sam(model.parameters(), base), make_sam(model.parameters(), base, "asam")
    assert (sam.rho, sam.adaptive, asam.rho, asam.adaptive, asam.eta) == (0.05, False, 0.5, True, 0.01)
    assert SAM(model.parameters(), base, adaptive=True).rho == 0.5
    assert make_sam(model.parameters(), base, "asam", rho=1.0).rho == 1.0


def test_step_order_is_enforced():
    model = tiny_model()
    sam = make_sam(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="without first_step"):
        sam.second_step()
    _loss(model, _batch()).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        sam.first_step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, r"rho must be >= 0, got -0.1"),
        ({"eta": -1.0}, r"eta must be >= 0, got -1.0"),
    ],
)
def test_sam_rejects_bad_arguments(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_make_sam_rejects_bad_arguments():
    model = tiny_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"kind must be one of \('sam', 'asam'\), got 'gsam'"):
        make_sam(model.parameters(), base, "gsam")
    with pytest.raises(ValueError, match=r"rho must be >= 0, got -1"):
        make_sam(model.parameters(), base, "asam", rho=-1)
    with pytest.raises(ValueError, match="at least one parameter"):
        make_sam([], base)
    with pytest.raises(TypeError, match="base_optimizer"):
        make_sam(model.parameters(), torch.optim.SGD)
