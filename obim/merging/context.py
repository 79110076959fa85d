"""What every sparsifier and combiner sees: its parameters, and the per-tensor context of one merge step."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checks import number_in, one_of  # noqa: F401  (parameter checks live beside Param)
from .errors import ObimError
from .threads import parallel_map


@dataclass(frozen=True)
class Param:
    """A method parameter: name, default, a check returning an error text (or None), and whether models may
    override it one by one (`models[i].parameters`)."""

    name: str
    default: Any
    check: Callable[[Any], str | None] = lambda v: None
    per_model: bool = False
    doc: str = ""


def random_key(seed: int, tensor: str, model: str) -> int:
    """The random stream of (run seed, tensor name, model name): independent of visiting order and device."""
    h = hashlib.sha256(f"{seed}\x00{tensor}\x00{model}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def uniform(key: int, shape: torch.Size | tuple[int, ...], draw: int = 0, chunk: int = 1 << 20) -> torch.Tensor:
    """float32 uniforms in [0, 1) on a 2^-24 grid (the top 24 bits of 32-bit SFC64 draws: ~0.5 ns per number,
    torch's CPU generator ~3.5 ns). Chunk j of draw `draw` has its own stream, SeedSequence(key, (draw, j)), so
    chunks fill in parallel and the bytes do not depend on the thread count."""
    n = math.prod(shape)
    out = np.empty(n, dtype=np.float32)

    def fill(j: int) -> None:
        start, stop = j * chunk, min((j + 1) * chunk, n)
        gen = np.random.SFC64(np.random.SeedSequence(key, spawn_key=(draw, j)))
        bits = gen.random_raw((stop - start + 1) // 2).view(np.uint32)[: stop - start]
        bits >>= np.uint32(8)
        np.multiply(bits, np.float32(2.0**-24), out=out[start:stop], casting="unsafe")

    parallel_map(fill, range((n + chunk - 1) // chunk))
    return torch.from_numpy(out).view(shape)


class Sparse:
    """A sparsifier's output for one model: its (masked, rescaled) task vector and, for combiners that need one,
    a per-entry score (a ranking for IM, a weight for PCB's weighted mean). A score may be given as a function,
    computed when the combiner asks: IM then holds one model's scores at a time."""

    def __init__(self, delta: torch.Tensor, score: torch.Tensor | Callable[[], torch.Tensor] | None = None):
        self.delta = delta
        self._score = score

    @property
    def score(self) -> torch.Tensor | None:
        return self._score() if callable(self._score) else self._score


@dataclass
class TensorContext:
    name: str  # tensor name
    models: list[str]  # model names in the base order
    params: list[dict[str, Any]]  # resolved parameters, one dict per model (method-wide values included)
    seed: int
    order: list[int]  # IM order for this tensor (indices into models)
    stats: list[torch.Tensor | None]  # per model: its statistics of this tensor (the method's kind; None: none)
    device: torch.device = torch.device("cpu")  # noqa: RUF009  (immutable: one shared default is safe)
    base: torch.Tensor | None = None  # the base's float32 tensor, for a combiner that declares `uses_base` only
    block: int | None = None  # the decoder block this tensor is in (None: outside the blocks)
    n_blocks: int = 0  # the model's decoder blocks
    task_sum_l1: float = 0.0  # |Σt δt|₁ of the task vectors as read, for a combiner with `uses_task_sum` only
    _draws: dict[int, int] = field(default_factory=dict)

    def param(self, key: str) -> Any:
        """A method-wide parameter (the same for every model)."""
        return self.params[0][key]

    def rand(self, i: int, shape: torch.Size) -> torch.Tensor:
        """Uniform [0, 1) numbers for model i; successive calls for one (tensor, model) draw new numbers."""
        draw = self._draws.get(i, 0)
        self._draws[i] = draw + 1
        return uniform(random_key(self.seed, self.name, self.models[i]), tuple(shape), draw).to(self.device)


def no_nan_scores(score: torch.Tensor, ctx: Any, i: int) -> torch.Tensor:
    """score, after a one-line error where it holds a NaN (a saliency δ²·h is one where |δ|² overflows and h is 0):
    a NaN has no place in an order, and the selections would keep or drop it by its bit pattern."""
    if torch.isnan(score.sum()) and bool(torch.isnan(score).any()):  # (a sum: one cheap pass; confirmed first)
        raise ObimError(f"tensor {ctx.name}: the scores of model '{ctx.models[i]}' have NaN entries")
    return score
