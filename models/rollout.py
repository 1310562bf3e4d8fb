"""Batched, KV-cached sampling of responses for RL and task evaluation, with per-token log-probs and routes.

A network here is any decoder with `forward(tokens_BT, cache, start_pos, routing=...) -> logits [B, T, V]`
and `new_cache(batch, max_len)` (`models.transformer.Transformer` and the families built like it).

Prompts of equal token length are decoded together (no padding ever enters attention); each row stops at
its first stop token (the row then keeps emitting it, unread), and a batch stops when every row has.
`use_cache=False` recomputes the whole prefix at every step: the slow reference the cached path is tested
and benchmarked against.

Shapes: B rows of one length group, P prompt tokens, R response tokens, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from models.layers.elastic import RoutingLimit
from models.moe.replay import RouteReplay
from models.transformer import sample_next

__all__ = ["Rollout", "response_logprobs", "sample_responses"]


@dataclass
class Rollout:
    """What sampling returns, one entry per row (in the order the prompts were given).

    responses: the sampled tokens up to and including the first stop token (or max_new_tokens of them).
    logp: [R] float32 log-probabilities of those tokens under the sampling distribution (the network's
        logits / temperature, before top-k filtering) of the network that sampled them.
    finished: whether the row emitted a stop token.
    routes: with record_routes, per row {layer: [P + R - 1, k]}: the experts each input position was routed
        to (the positions a training forward over prompt + response[:-1] sees), else None.
    """

    prompts: list[list[int]]
    responses: list[list[int]]
    logp: list[torch.Tensor]
    finished: list[bool]
    routes: Optional[list[dict[int, torch.Tensor]]] = None
    decode_steps: int = 0  # network calls made (prefills + decode steps), for benchmarks
    generated_tokens: int = field(default=0)


def _length_groups(prompts: Sequence[Sequence[int]], max_batch: Optional[int]) -> list[list[int]]:
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    groups = []
    for length in sorted(by_len):
        rows = by_len[length]
        step = max_batch or len(rows)
        groups.extend(rows[i:i + step] for i in range(0, len(rows), step))
    return groups


@torch.no_grad()
def sample_responses(
    net,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    record_routes: bool = False,
    max_batch: Optional[int] = None,
) -> Rollout:
    """Sample one response per prompt (repeat a prompt G times for a group). temperature 0 is greedy
    (log-probs then of softmax(logits)). max_batch caps the rows decoded together."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not stop_ids:
        raise ValueError("stop_ids must name at least one token")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with the EOS/BOS token)")
    device = next(net.parameters()).device
    stop = torch.as_tensor(sorted(set(int(t) for t in stop_ids)), device=device)
    was_training = net.training
    net.eval()
    n = len(prompts)
    responses: list[list[int]] = [[] for _ in range(n)]
    logps: list[torch.Tensor] = [torch.zeros(0) for _ in range(n)]
    finished = [False] * n
    routes: Optional[list[dict]] = [{} for _ in range(n)] if record_routes else None
    calls = generated = 0
    scale = temperature if temperature > 0 else 1.0
    for rows in _length_groups(prompts, max_batch):
        B, P = len(rows), len(prompts[rows[0]])
        x = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
        replay = RouteReplay("record") if record_routes else None
        sub = {"routing": RoutingLimit(replay=replay)} if replay is not None else {}
        cache = net.new_cache(B, P + max_new_tokens) if use_cache else None
        out_tokens, out_logp = [], []
        done = torch.zeros(B, dtype=torch.bool, device=device)
        logits = net(x, cache, 0, **sub)[:, -1] if use_cache else None
        calls += 1 if use_cache else 0
        seq = x
        for step in range(max_new_tokens):
            if not use_cache:
                if replay is not None:
                    replay.recorded.clear()  # keep only the last full pass: it covers every position
                logits = net(seq, **sub)[:, -1]
                calls += 1
            logits = logits.float()
            nxt = sample_next(logits, temperature, top_k, None, generator)
            lp = torch.log_softmax(logits / scale, dim=-1).gather(1, nxt[:, None]).squeeze(1)
            nxt = torch.where(done, stop[0], nxt)
            out_tokens.append(nxt)
            out_logp.append(lp)
            done |= torch.isin(nxt, stop)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                logits = net(nxt[:, None], cache, seq.shape[1] - 1, **sub)[:, -1]
                calls += 1
        toks = torch.stack(out_tokens, 1).cpu()  # [B, R]
        lps = torch.stack(out_logp, 1).cpu()
        # cached: prefill + one call per fed token; uncached: the last full pass. Either way P + R_max - 1 positions.
        stacked = replay.stacked(B) if replay is not None else None
        stop_set = set(stop.tolist())
        for j, i in enumerate(rows):
            row = toks[j].tolist()
            hit = [t for t, tok in enumerate(row) if tok in stop_set]
            end = hit[0] + 1 if hit else len(row)
            responses[i] = row[:end]
            logps[i] = lps[j, :end].clone()
            finished[i] = bool(hit)
            generated += end
            if routes is not None:
                routes[i] = {layer: r[j, :P + end - 1].cpu() for layer, r in stacked.items()}
    net.train(was_training)
    return Rollout([list(p) for p in prompts], responses, logps, finished, routes, calls, generated)


def response_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities [B, T] of tokens_BT[:, t] under logits_BTV[:, t] / temperature, in float32."""
    scale = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits_BTV.float() / scale, dim=-1)
    return logp.gather(-1, tokens_BT[..., None]).squeeze(-1)
