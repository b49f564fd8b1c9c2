import pytest
import torch
import torch._dynamo  # noqa: F401  torch.optim imports it lazily (~2 s): pay that at collection, not in a test

from stepwise.errors import ConfigError
from stepwise.optim_schedules import MomentumDecay, demon_beta1, exp_floor_beta1

S = 100


def params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_demon_monotone_and_ends_at_zero():
    md = MomentumDecay(torch.optim.AdamW(params(), lr=1e-3, betas=(0.9, 0.999)), S)
    b = [md.beta1(k) for k in range(S + 10)]
    assert b[0] == pytest.approx(0.9) and all(y <= x for x, y in zip(b, b[1:]))
    assert b[S] == 0.0 and b[-1] == 0.0
    assert demon_beta1(50, 100, 0.9) == pytest.approx(0.9 * 0.5 / (0.1 + 0.45))


def test_exp_floor_monotone_and_reaches_floor():
    md = MomentumDecay(torch.optim.AdamW(params(), lr=1e-3, betas=(0.9, 0.999)), S, form="exp_floor", floor=0.4)
    b = [md.beta1(k) for k in range(2 * S)]
    assert b[0] == pytest.approx(0.9) and all(y <= x for x, y in zip(b, b[1:]))
    assert b[S] == pytest.approx(0.4) and min(b) == pytest.approx(0.4)
    md = MomentumDecay(torch.optim.AdamW(params(), lr=1e-3), S, form="exp_floor", decay=0.99, floor=0.5)
    assert md.beta1(10) == pytest.approx(0.9 * 0.99 ** 10) == exp_floor_beta1(10, 0.9, 0.99, 0.5)


@pytest.mark.parametrize("form", ["demon", "exp_floor"])
def test_adamw_lr_times_one_minus_beta1_invariant(form):
    opt = torch.optim.AdamW([{"params": params(), "lr": 1e-3}, {"params": params(), "lr": 4e-3}], betas=(0.95, 0.99))
    md = MomentumDecay(opt, S, form=form)
    for k in (0, 1, 37, 99):  # demon at k=S gives factor 1-beta0 and beta1 0, still invariant
        md.step(k)
        for g, base in zip(opt.param_groups, (1e-3, 4e-3)):
            assert g["betas"][0] == pytest.approx(md.beta1(k)) and g["betas"][1] == 0.99
            assert g["lr"] * (1 - g["betas"][0]) == pytest.approx(base * (1 - 0.95))
        opt.zero_grad()
        sum(p.sum() for g in opt.param_groups for p in g["params"]).backward()
        opt.step()  # AdamW runs with the written betas


def test_sgd_momentum_and_tied_dampening():
    heavy = torch.optim.SGD(params(), lr=0.1, momentum=0.9)
    ema_form = torch.optim.SGD(params(), lr=0.1, momentum=0.9, dampening=0.9)
    for opt, tied in ((heavy, False), (ema_form, True)):
        md = MomentumDecay(opt, S)
        md.step(60)
        g = opt.param_groups[0]
        assert g["momentum"] == pytest.approx(md.beta1(60)) and md.beta1(60) < 0.9
        assert g["dampening"] == (pytest.approx(md.beta1(60)) if tied else 0)
        assert g["lr"] * (1 - g["momentum"]) == pytest.approx(0.1 * 0.1)


def test_no_compensation_and_external_warmup():
    opt = torch.optim.AdamW(params(), lr=1e-3)
    md = MomentumDecay(opt, S, compensate=False)
    md.step(50)
    assert opt.param_groups[0]["lr"] == 1e-3 and md.factor(50) == 1.0
    md = MomentumDecay(torch.optim.AdamW(params(), lr=1e-3), S)
    md.step(50, lr=2e-4)  # e.g. the warm-up lr of step 50
    assert md.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * md.factor(50))
    assert md.factor(50) == pytest.approx(0.1 / (1 - md.beta1(50)))


def test_state_dict_round_trip_after_optimizer_resume():
    opt = torch.optim.AdamW(params(), lr=1e-3, betas=(0.9, 0.999))
    md = MomentumDecay(opt, S)
    md.step(40)
    state, opt_state = md.state_dict(), opt.state_dict()
    opt2 = torch.optim.AdamW(params(), lr=1e-3, betas=(0.9, 0.999))
    opt2.load_state_dict(opt_state)  # groups now hold the decayed beta1 and compensated lr
    md2 = MomentumDecay(opt2, S)
    assert md2.beta0s[0] != pytest.approx(0.9)  # would be wrong without the schedule's own state
    md2.load_state_dict(state)
    assert md2.last_step == 40 and md2.beta0s == [0.9] and md2.base_lrs == [1e-3]
    for k in (41, 70, 100):
        md.step(k)
        md2.step(k)
        assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("make, kwargs, needle", [
    (lambda: torch.optim.AdamW(params()), {"form": "cosine"},
     "unknown momentum decay form 'cosine'; valid: ['demon', 'exp_floor']"),
    (lambda: torch.optim.AdamW(params()), {"total_steps": 0}, "total_steps=0 must be an integer >= 1"),
    (lambda: torch.optim.Adagrad(params()), {}, "needs an optimizer with 'betas'"),
    (lambda: torch.optim.AdamW(params()), {"beta0": 1.0}, "beta0=1.0 must be in [0, 1)"),
    (lambda: torch.optim.AdamW(params()), {"form": "exp_floor", "floor": 0.95}, "floor=0.95 must be in [0, beta0=0.9]"),
    (lambda: torch.optim.AdamW(params()), {"form": "exp_floor", "decay": 1.5}, "decay=1.5 must be in (0, 1]"),
    (lambda: torch.optim.AdamW(params()), {"form": "exp_floor", "floor": 0.0}, "needs an explicit decay"),
])
def test_config_errors(make, kwargs, needle):
    kwargs = {"total_steps": S, **kwargs}
    with pytest.raises(ConfigError) as e:
        MomentumDecay(make(), **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_lr_only_control_has_the_decayed_runs_lr_with_constant_beta():
    """decay_beta=False: beta1 stays beta0, lr follows the compensated trajectory of the decayed run exactly."""
    def opt():
        return torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1e-3, betas=(0.9, 0.999))

    decayed, control = opt(), opt()
    md, lr_only = MomentumDecay(decayed, 100), MomentumDecay(control, 100, decay_beta=False)
    for k in (0, 25, 50, 99, 100):
        md.step(k, lr=1e-3)
        lr_only.step(k, lr=1e-3)
        assert control.param_groups[0]["betas"][0] == 0.9
        assert control.param_groups[0]["lr"] == decayed.param_groups[0]["lr"]
    # at k = S the Demon beta1 is 0: lr = 1e-3 (1 - 0.9) / (1 - 0) = 1e-4 (hand-computed)
    assert control.param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="changes nothing"):
        MomentumDecay(opt(), 10, decay_beta=False, compensate=False)
