"""Index-codebook vector quantization: nearest-code search by one matmul, EMA or learned codebook,
dead-code restart, and residual VQ (several codebooks applied to successive residuals).

Shapes: N vectors, D dim, V codebook size, Q residual levels. Inputs are [..., D]; indices [...].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["RVQOutput", "ResidualVQ", "VQOutput", "VectorQuantizer", "nearest_reference"]


def nearest_reference(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Slow, obviously correct search: `torch.cdist` then argmin (tests and benchmarks)."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.cdist(flat.double(), codebook.double()).argmin(-1).reshape(x.shape[:-1])


@dataclass
class VQOutput:
    quantized: torch.Tensor     # straight-through: value = code, gradient = identity to the input
    indices: torch.Tensor
    loss: torch.Tensor          # commitment (+ codebook term when the codebook is learned by gradient)
    commit_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor         # fraction of the codebook used in this batch


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer over a codebook of `codebook_size` vectors of size `dim`.

    l2_normalize: search and codes on the unit sphere (cosine VQ).
    ema: the codebook follows exponential moving averages of its assigned vectors (no gradient);
        otherwise it is a parameter trained by the codebook loss ||sg(x) - q||^2.
    restart_dead_codes: in training, a code whose EMA usage count falls below
        `dead_code_threshold` is moved onto a random input vector of the batch.
    """

    def __init__(self, codebook_size: int, dim: int, *, l2_normalize: bool = True, ema: bool = False,
                 ema_decay: float = 0.99, restart_dead_codes: bool = True, dead_code_threshold: float = 1.0,
                 commitment_weight: float = 0.25, search_chunk: int = 8192) -> None:
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"need codebook_size >= 2 and dim >= 1, got {codebook_size}, {dim}")
        self.codebook_size, self.dim = codebook_size, dim
        self.l2_normalize, self.ema = l2_normalize, ema
        self.ema_decay = ema_decay
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, dead_code_threshold
        self.commitment_weight = commitment_weight
        self.search_chunk = search_chunk
        init = torch.randn(codebook_size, dim)
        # EMA of per-code assignment counts; starts "alive" so nothing restarts on step 1.
        count0 = float(dead_code_threshold) + 1.0
        self.register_buffer("ema_count", torch.full((codebook_size,), count0))
        if ema:
            self.register_buffer("embed", init)
            # sum = code x count, so that an unassigned code keeps its value (sum / count) instead of
            # being scaled by 1 / count on the first update
            self.register_buffer("ema_sum", init * count0)
        else:
            self.embed = nn.Parameter(init)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embed, dim=-1) if self.l2_normalize else self.embed

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """argmin_v ||x - e_v||^2 = argmin_v (||e_v||^2 - 2 x.e_v), one matmul per row chunk."""
        flat = self._prep(x.reshape(-1, x.shape[-1])).float()
        book = self.codebook().float()
        e2 = (book * book).sum(-1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for s in range(0, flat.shape[0], self.search_chunk):
            chunk = flat[s:s + self.search_chunk]
            out[s:s + chunk.shape[0]] = torch.addmm(e2[None, :], chunk, book.t(), alpha=-2.0).argmin(-1)
        return out.reshape(x.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook())

    def forward(self, x: torch.Tensor) -> VQOutput:
        xp = self._prep(x)
        idx = self.nearest(xp)
        if self.training:
            self._update(xp.detach().reshape(-1, self.dim), idx.reshape(-1))
        q = self.lookup(idx)
        commit = F.mse_loss(xp, q.detach())
        loss = self.commitment_weight * commit
        if not self.ema:
            loss = loss + F.mse_loss(q, xp.detach())
        quantized = xp + (q - xp).detach()
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=self.codebook_size).float()
            p = counts / counts.sum().clamp_min(1)
            perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
            usage = (counts > 0).float().mean()
        return VQOutput(quantized, idx, loss, commit, perplexity, usage)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        onehot_counts = torch.bincount(idx, minlength=self.codebook_size).to(flat.dtype)
        sums = torch.zeros(self.codebook_size, self.dim, device=flat.device, dtype=flat.dtype).index_add_(0, idx, flat)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(onehot_counts)
            dist.all_reduce(sums)
        d = self.ema_decay
        self.ema_count.mul_(d).add_(onehot_counts, alpha=1 - d)
        if self.ema:
            self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
            n = self.ema_count.sum()
            # Laplace smoothing keeps rarely used codes from dividing by ~0
            smoothed = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n
            self.embed.copy_(self.ema_sum / smoothed[:, None])
        if self.restart_dead_codes:
            dead = self.ema_count < self.dead_code_threshold
            if dead.any():
                self._restart(dead, flat)

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        n_dead = int(dead.sum())
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, src=0)  # every rank restarts onto the same vectors
        self.embed[dead] = new.to(self.embed.dtype)
        if self.ema:
            self.ema_sum[dead] = new * self.dead_code_threshold
        self.ema_count[dead] = float(self.dead_code_threshold)


@dataclass
class RVQOutput:
    quantized: torch.Tensor
    indices: torch.Tensor       # [..., Q]
    loss: torch.Tensor
    perplexity: list[torch.Tensor]
    usage: list[torch.Tensor]


class ResidualVQ(nn.Module):
    """`num_quantizers` VectorQuantizers, each quantizing what the previous levels left over."""

    def __init__(self, num_quantizers: int, codebook_size: int, dim: int, **vq_kwargs) -> None:
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        self.levels = nn.ModuleList(VectorQuantizer(codebook_size, dim, **vq_kwargs) for _ in range(num_quantizers))

    @property
    def num_quantizers(self) -> int:
        return len(self.levels)

    def forward(self, x: torch.Tensor) -> RVQOutput:
        resid = x
        total = torch.zeros_like(x)
        idx, loss, ppl, usage = [], x.new_zeros(()), [], []
        for vq in self.levels:
            out = vq(resid)
            q = vq.lookup(out.indices)
            total = total + q
            resid = resid - q.detach()
            idx.append(out.indices)
            loss = loss + out.loss
            ppl.append(out.perplexity)
            usage.append(out.usage)
        quantized = x + (total - x).detach()
        return RVQOutput(quantized, torch.stack(idx, dim=-1), loss / len(self.levels), ppl, usage)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        resid, idx = x, []
        for vq in self.levels:
            i = vq.nearest(resid)
            resid = resid - vq.lookup(i)
            idx.append(i)
        return torch.stack(idx, dim=-1)

    def decode(self, indices: torch.Tensor, num_levels: Optional[int] = None) -> torch.Tensor:
        q = num_levels or self.num_quantizers
        return sum(self.levels[j].lookup(indices[..., j]) for j in range(q))
