"""Momentum decay with learning-rate compensation, MDLRC (Xu et al., arXiv 2404.07946, Sec. 4.3).

The paper's exact schedule is not public (docs/methods.md, momentum decay); two third-party readings are implemented:
  "demon"     (default): tau = min(k/S, 1), beta1 = beta0 (1 - tau) / ((1 - beta0) + beta0 (1 - tau))
              (the Demon decay rule, Chen et al., arXiv 1910.04952), reaching 0 at k = S;
  "exp_floor": beta1 = max(beta0 decay^k, floor); decay=None means decay = (floor/beta0)^(1/S), so the floor is
              reached at k = S.
Compensation multiplies the learning rate by (1 - beta0)/(1 - beta1(k)), keeping lr (1 - beta1) — the step taken
on the newest gradient by EMA-form momentum (Adam's m = beta1 m + (1 - beta1) g) — constant, so lowering the
momentum does not over-amplify updates. PyTorch SGD is heavy-ball form (m = mu m + (1 - dampening) g): the
invariant holds there only when dampening == momentum; groups built that way keep the two tied, others get
momentum alone changed.

Composition with a warm-up/decay schedule: `step(k, lr=warmup_lr(k))` sets lr = warmup_lr(k) * factor(k); without
`lr` the group's lr at construction is the base. Adam's bias correction uses the current beta1 (negligible once
beta1^k ~ 0). Build the schedule before `optimizer.load_state_dict`, or restore its own `state_dict`, since
beta0 and the base lrs are read from the optimizer at construction.

Control (`decay_beta=False`): beta1 stays beta0 while the lr follows exactly the compensated trajectory
lr (1 - beta0)/(1 - beta1(k)) of the decayed run, which with EMA-form momentum is an lr *annealing* from lr to
lr (1 - beta0) (0.1 lr for beta0 = 0.9, Demon form). `conf/strategy/lr_decay.yaml` uses it to separate the effect
of the lr annealing from the effect of lowering the momentum.
"""
from __future__ import annotations

import torch

from .errors import ConfigError


def demon_beta1(step: int, total_steps: int, beta0: float) -> float:
    """Demon momentum beta1 = beta0 (1 - tau) / ((1 - beta0) + beta0 (1 - tau)), tau = k/S (Demon, arXiv 1910.04952)."""
    rest = 1.0 - min(max(step / total_steps, 0.0), 1.0)
    return beta0 * rest / ((1.0 - beta0) + beta0 * rest)


def exp_floor_beta1(step: int, beta0: float, decay: float, floor: float) -> float:
    """Exponential momentum decay with a floor, beta1 = max(beta0 decay^k, floor) (arXiv 2404.07946, 3rd-party)."""
    return max(beta0 * decay ** max(step, 0), floor)


def compensated_lr_factor(beta0: float, beta1: float) -> float:
    """LR multiplier (1 - beta0)/(1 - beta1) keeping lr (1 - beta1) constant (arXiv 2404.07946, MDLRC)."""
    return (1.0 - beta0) / (1.0 - beta1)


MOMENTUM_FORMS = ("demon", "exp_floor")


class MomentumDecay:
    """Schedules beta1 (AdamW `betas[0]`, SGD `momentum`) and the compensated lr of every param group (MDLRC).

    `beta1(k, group)` and `factor(k, group)` are pure queries; `step(k, lr=None)` writes them into the optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, form: str = "demon",
                 beta0: float | None = None, decay: float | None = None, floor: float = 0.4, compensate: bool = True,
                 decay_beta: bool = True):
        if form not in MOMENTUM_FORMS:
            raise ConfigError(f"unknown momentum decay form {form!r}; valid: {list(MOMENTUM_FORMS)}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"momentum decay: total_steps={total_steps!r} must be an integer >= 1")
        self.optimizer, self.total_steps, self.form, self.compensate = optimizer, total_steps, form, bool(compensate)
        if not isinstance(decay_beta, bool):
            raise ConfigError(f"momentum decay: decay_beta={decay_beta!r} must be true or false")
        if not decay_beta and not compensate:
            raise ConfigError("momentum decay: decay_beta=false with compensate=false changes nothing; use "
                              "momentum_decay: none")
        self.decay_beta = decay_beta
        self.keys = [self._momentum_key(g) for g in optimizer.param_groups]
        self.beta0s = [float(beta0) if beta0 is not None else self._read(g, k)
                       for g, k in zip(optimizer.param_groups, self.keys)]
        for b in self.beta0s:
            if not 0 <= b < 1:
                raise ConfigError(f"momentum decay: beta0={b!r} must be in [0, 1)")
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.tied = [k == "momentum" and g.get("dampening", 0) == g["momentum"] and g["momentum"] > 0
                     for g, k in zip(optimizer.param_groups, self.keys)]
        self.floor, self.decays = float(floor), [1.0] * len(self.beta0s)
        if form == "exp_floor":
            if not 0 <= floor <= min(self.beta0s):
                raise ConfigError(f"momentum decay: floor={floor!r} must be in [0, beta0={min(self.beta0s)}]")
            if decay is None and floor == 0:
                raise ConfigError("momentum decay: exp_floor with floor=0 needs an explicit decay in (0, 1]")
            if decay is not None and not 0 < decay <= 1:
                raise ConfigError(f"momentum decay: decay={decay!r} must be in (0, 1]")
            self.decays = [float(decay) if decay is not None else (floor / b) ** (1 / total_steps) if b > 0 else 1.0
                           for b in self.beta0s]
        self.last_step = -1

    @staticmethod
    def _momentum_key(group: dict) -> str:
        """'betas' for Adam-family groups, 'momentum' for SGD; ConfigError otherwise."""
        for key in ("betas", "momentum"):
            if key in group:
                return key
        raise ConfigError("momentum decay needs an optimizer with 'betas' (Adam, AdamW) or 'momentum' (SGD) "
                          f"param groups; got keys {sorted(group)}")

    @staticmethod
    def _read(group: dict, key: str) -> float:
        return float(group["betas"][0] if key == "betas" else group["momentum"])

    def scheduled_beta1(self, step: int, group: int = 0) -> float:
        """beta1(k) of the decay schedule (what the compensation factor is computed from)."""
        b0 = self.beta0s[group]
        if self.form == "demon":
            return demon_beta1(step, self.total_steps, b0)
        return exp_floor_beta1(step, b0, self.decays[group], self.floor)

    def beta1(self, step: int, group: int = 0) -> float:
        """The momentum coefficient param group `group` uses at step k (beta0 in the lr-only control)."""
        return self.scheduled_beta1(step, group) if self.decay_beta else self.beta0s[group]

    def factor(self, step: int, group: int = 0) -> float:
        """LR multiplier at step k: (1 - beta0)/(1 - beta1(k)) with compensation, else 1."""
        b1 = self.scheduled_beta1(step, group)
        return compensated_lr_factor(self.beta0s[group], b1) if self.compensate else 1.0

    def step(self, step: int, lr: float | list[float] | None = None) -> None:
        """Write beta1(k) and lr = base * factor(k) into every param group; `lr` overrides the base (e.g. warm-up)."""
        if lr is None:
            bases = self.base_lrs
        else:
            bases = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(self.base_lrs)
        for i, (group, key) in enumerate(zip(self.optimizer.param_groups, self.keys)):
            b1 = self.beta1(step, i)
            if key == "betas":
                old = group["betas"]
                if isinstance(old[0], torch.Tensor):
                    old[0].fill_(b1)
                else:
                    group["betas"] = (b1, *old[1:])
            else:
                group["momentum"] = b1
                if self.tied[i]:
                    group["dampening"] = b1
            group["lr"] = bases[i] * self.factor(step, i)
        self.last_step = step

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "form": self.form, "compensate": self.compensate,
                "decay_beta": self.decay_beta,
                "beta0s": list(self.beta0s), "base_lrs": list(self.base_lrs), "tied": list(self.tied),
                "floor": self.floor, "decays": list(self.decays), "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        if len(state["beta0s"]) != len(self.optimizer.param_groups):
            raise ConfigError(f"momentum decay state has {len(state['beta0s'])} param groups, the optimizer "
                              f"{len(self.optimizer.param_groups)}")
        for key in ("total_steps", "form", "compensate", "floor", "last_step"):
            setattr(self, key, state[key])
        self.decay_beta = state.get("decay_beta", True)
        self.beta0s, self.base_lrs = list(state["beta0s"]), list(state["base_lrs"])
        self.tied, self.decays = list(state["tied"]), list(state["decays"])
