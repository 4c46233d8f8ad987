"""Building blocks shared by model families: condition normalisation, sensor (or layer)
embeddings, FiLM modulation and an exponential moving average of weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from uhg.errors import ConditionError


@dataclass(frozen=True)
class ConditionNorm:
    """Maps physical event conditions to O(1) model inputs.

    Condition k becomes `(f(x) - center[k]) / scale[k]` with f = log for positive quantities
    (luminosity, currents, incident energy), so the training range maps to [-1, 1] and values
    outside it (zero-shot extrapolation) continue linearly in log space."""

    names: tuple[str, ...]
    log: tuple[bool, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def from_ranges(cls, ranges: Mapping[str, tuple[float, float]], names: Sequence[str]) -> ConditionNorm:
        """Normalisation for `names` from their (min, max) training ranges."""
        log, center, scale = [], [], []
        for n in names:
            if n not in ranges:
                raise ConditionError(f"condition {n!r} is not in the training data; available: {sorted(ranges)}")
            lo, hi = (float(v) for v in ranges[n])
            use_log = lo > 0
            a, b = (math.log(lo), math.log(hi)) if use_log else (lo, hi)
            log.append(use_log)
            center.append((a + b) / 2)
            scale.append((b - a) / 2 if b > a else 1.0)
        return cls(tuple(names), tuple(log), tuple(center), tuple(scale))

    def __call__(self, conditions: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_conditions) float32 from {name: (B,) tensor in physical units}."""
        cols = []
        for n, lg, c, s in zip(self.names, self.log, self.center, self.scale, strict=True):
            if n not in conditions:
                raise ConditionError(f"condition {n!r} is required by the model; got {sorted(conditions)}")
            x = conditions[n].to(torch.float64)
            if lg:
                if bool((x <= 0).any()):
                    raise ConditionError(f"condition {n!r} must be positive (it is log-scaled), got min {float(x.min())}")
                x = torch.log(x)
            cols.append(((x - c) / s).to(torch.float32))
        if not cols:
            return torch.zeros(0, 0)
        return torch.stack(cols, dim=1)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> ConditionNorm:
        return cls(tuple(d["names"]), tuple(bool(x) for x in d["log"]), tuple(map(float, d["center"])),
                   tuple(map(float, d["scale"])))


class SensorEmbedding(nn.Module):
    """(n_sensors, dim) embedding of each sensor (or calorimeter layer): a learned id
    embedding plus an MLP of fixed geometry features (r, phi, z, ...), so sensors that look
    alike geometrically start alike."""

    def __init__(self, features: np.ndarray, dim: int):
        super().__init__()
        feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
        self.register_buffer("features", feats, persistent=False)
        self.ids = nn.Embedding(feats.shape[0], dim)
        nn.init.normal_(self.ids.weight, std=0.02)
        self.geometry = nn.Sequential(nn.Linear(feats.shape[1], dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self) -> torch.Tensor:
        return self.ids.weight + self.geometry(self.features)


class FiLM(nn.Module):
    """Feature-wise linear modulation: x * (1 + gamma(c)) + beta(c), with gamma, beta zero at init."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...) features; cond: (N, cond_dim)."""
        gamma, beta = self.proj(cond).chunk(2, dim=-1)
        shape = gamma.shape + (1,) * (x.dim() - 2)
        return x * (1 + gamma.view(shape)) + beta.view(shape)

    def modulate_(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """`forward` in place on x (no autograd through x): the same values, bit for bit. A bf16 x
        (sampling in bf16) is modulated in bf16: 1 + gamma and beta rounded to it."""
        gamma, beta = self.proj(cond).chunk(2, dim=-1)
        scale = 1 + gamma
        if x.dtype == torch.bfloat16:
            scale, beta = scale.to(x.dtype), beta.to(x.dtype)
        elif torch.result_type(x, gamma) != x.dtype:  # out of place it would promote x: keep forward's dtype
            return self(x, cond)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # As (N, H, W, C) rows with the factors repeated along one row (W x C, contiguous): a
            # factor broadcast along the strided channel dimension takes the scalar path (bf16 add:
            # ~10x slower). Elementwise products and sums: the same values in any order.
            n, c, _, w = x.shape
            rows = x.permute(0, 2, 3, 1)
            rows.mul_(scale.view(n, 1, 1, c).expand(n, 1, w, c).contiguous())
            rows.add_(beta.view(n, 1, 1, c).expand(n, 1, w, c).contiguous())
            return x
        shape = gamma.shape + (1,) * (x.dim() - 2)
        return x.mul_(scale.view(shape)).add_(beta.view(shape))


class ConditionEmbedding(nn.Module):
    """(B, n_conditions) normalised conditions -> (B, dim); works with zero conditions."""

    def __init__(self, n_conditions: int, dim: int):
        super().__init__()
        self.n = n_conditions
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mlp = nn.Sequential(nn.Linear(n_conditions, dim), nn.SiLU(), nn.Linear(dim, dim)) if n_conditions else None

    def forward(self, cond: torch.Tensor, batch: int) -> torch.Tensor:
        out = self.bias.expand(batch, -1)
        return out + self.mlp(cond) if self.mlp is not None else out


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    Kept on the same device as the module, as plain tensors (no autograd); `state_dict()` is
    what the export writes. Update n (from 0) uses the decay min(decay, (1 + n) / (10 + n)): a
    fixed 0.99 over a 100-step run would still export 37% of the initial weights. A tensor equal
    to its average is left as it is: d * x + (1 - d) * x rounds away from x, and the fitted tables
    that ride in the state as float buffers (shape vocabularies, count-law positions, bank
    starts) must be exported exactly, not drifted by 1e-7 per update. `updates` is the number of
    updates so far (a resumed run sets it from its step count)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().clone().float() for k, v in _float_state(module).items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in _float_state(module).items():
            v = v.detach().float()
            if not torch.equal(self.shadow[k], v):
                self.shadow[k].mul_(d).add_(v, alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


def _float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
