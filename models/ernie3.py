"""ERNIE 3.0 on the shared trunk: a deep universal representation module, a projection to the task
width, a bidirectional NLU task module and a causal NLG task module with segment recurrence memory,
and the heads of the five pre-training tasks.

Shapes: B batch, T tokens, S segments, C universal width, D task width, V vocabulary, M memory.
Read top to bottom: config and presets, the network (NLU path, NLG path with memory), heads,
KV-cached generation with the NLG module, and the losses. papers.md section 3 is the specification;
the [I] choices (projection, memory placement, recurrence kind) are config fields.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import config_from_dict
from models.layers.attention import LayerKVCache
from models.layers.mask import AttentionMask
from models.layers.trunk import Trunk, TrunkConfig, next_memory

__all__ = ["PRESETS", "RECURRENCE", "Ernie3", "Ernie3Config", "Ernie3Memory", "masked_ce", "num_reorder_classes"]

# universal module (n_layers, d_model, n_heads) + task modules (task_layers, task_d_model, task_heads)
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, task_layers=1, task_d_model=64, task_heads=4),
    "small": dict(n_layers=4, d_model=256, n_heads=8, task_layers=2, task_d_model=128, task_heads=4),
    "base": dict(n_layers=12, d_model=768, n_heads=12, task_layers=4, task_d_model=512, task_heads=8),
}
# 'same_layer': ERNIE-Doc, layer n's memory is its own OUTPUT on the previous segment;
# 'shifted': Transformer-XL, layer n's memory is its INPUT (the layer below's output) there.
RECURRENCE = {"same_layer": "outputs", "shifted": "inputs"}


def num_reorder_classes(max_segments: int) -> int:
    """Sentence reordering classes: sum over n = 1..m of n! (every permutation of every split)."""
    return sum(math.factorial(n) for n in range(1, max_segments + 1))


@dataclass
class Ernie3Config(TrunkConfig):
    """The universal module's trunk fields (`TrunkConfig`), the task modules' sizes and the task heads.

    vocab_size: 0 = ask the DataModule (its tokenizer plus the special tokens).
    mem_len: memory tokens kept per layer for document-LM segments; recurrence: 'same_layer' | 'shifted'.
    reorder_segments: m of sentence reordering (classes = sum_{n<=m} n!).
    num_relations: classes of the relation-classification head used in fine-tuning (0 = none).
    """

    preset: str = "tiny"
    vocab_size: int = 0
    max_seq_len: int = 512
    task_layers: Optional[int] = None
    task_d_model: Optional[int] = None
    task_heads: Optional[int] = None
    mem_len: int = 64
    recurrence: str = "same_layer"
    reorder_segments: int = 3
    num_distance_classes: int = 3

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate_trunk()
        if self.recurrence not in RECURRENCE:
            raise ValueError(f"recurrence={self.recurrence!r} is not one of {sorted(RECURRENCE)}")
        for key in ("task_layers", "task_d_model", "task_heads", "max_seq_len", "reorder_segments"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {self.mem_len}")
        if self.task_d_model % self.task_heads or (self.task_d_model // self.task_heads) % 2:
            raise ValueError(f"task_d_model={self.task_d_model} must split into task_heads={self.task_heads} "
                             "heads of even size")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")

    @property
    def task_trunk(self) -> TrunkConfig:
        return TrunkConfig(n_layers=self.task_layers, d_model=self.task_d_model, n_heads=self.task_heads,
                           dropout=self.dropout, norm_eps=self.norm_eps, init_std=self.init_std,
                           rope_theta=self.rope_theta, attn_impl=self.attn_impl)

    @property
    def num_reorder(self) -> int:
        return num_reorder_classes(self.reorder_segments)

    @classmethod
    def from_dict(cls, d: dict) -> "Ernie3Config":
        return config_from_dict(cls, d, "Ernie3Config")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Ernie3Memory:
    """Recurrence memory of the NLG path: per layer [B, M, C] of the universal and [B, M, D] of the NLG
    module, and the position of the next segment's first token."""

    universal: list[Optional[torch.Tensor]]
    nlg: list[Optional[torch.Tensor]]
    next_pos: int = 0


def _padding_mask(valid_BT: Optional[torch.Tensor]) -> AttentionMask:
    """Full bidirectional attention among real tokens; padding sits in a document of its own."""
    if valid_BT is None:
        return AttentionMask.full()
    return AttentionMask.full((~valid_BT).long())


class Ernie3(nn.Module):
    """Token embedding -> universal trunk -> Linear(C, D) -> NLU trunk (bidirectional) | NLG trunk (causal)."""

    def __init__(self, cfg: Ernie3Config):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("Ernie3Config.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.universal = Trunk(cfg)
        self.proj = nn.Linear(cfg.d_model, cfg.task_d_model, bias=False)
        task = cfg.task_trunk
        self.nlu = Trunk(task)
        self.nlg = Trunk(task)
        self.mlm_head = nn.Linear(cfg.task_d_model, cfg.vocab_size, bias=False)  # knowledge-masked LM and UKTP
        self.lm_head = nn.Linear(cfg.task_d_model, cfg.vocab_size, bias=False)  # document LM
        self.reorder_head = nn.Linear(cfg.task_d_model, cfg.num_reorder)
        self.distance_head = nn.Linear(cfg.task_d_model, cfg.num_distance_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        for lin in (self.tok_emb, self.proj, self.mlm_head, self.lm_head, self.reorder_head, self.distance_head):
            nn.init.normal_(lin.weight, 0.0, std)
            if getattr(lin, "bias", None) is not None:
                nn.init.zeros_(lin.bias)
        for trunk in (self.universal, self.nlu, self.nlg):
            trunk.init_weights()

    def num_params(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        u = self.universal.num_params()
        return {"total": total, "activated": total - u["total"] + u["activated"]}

    # -- NLU: bidirectional ------------------------------------------------------------------------

    def forward_nlu(self, tokens_BT: torch.Tensor, valid_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """NLU task representation [B, T, D]: universal and NLU modules, both bidirectional over real tokens."""
        positions = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
        mask = _padding_mask(valid_BT)
        u = self.universal(self.drop(self.tok_emb(tokens_BT)), positions, mask).hidden
        return self.nlu(self.proj(u), positions, mask).hidden

    # -- NLG: causal, with segment recurrence memory -----------------------------------------------

    def empty_memory(self) -> Ernie3Memory:
        return Ernie3Memory([None] * self.cfg.n_layers, [None] * self.cfg.task_layers, 0)

    def forward_nlg(self, tokens_BT: torch.Tensor, memory: Optional[Ernie3Memory] = None, use_memory: bool = True,
                    ) -> tuple[torch.Tensor, Optional[Ernie3Memory]]:
        """NLG representation [B, T, D] of one segment and the next segment's memory.

        memory: this segment's memory (None = the document's first segment). With use_memory=False
        each segment stands alone (the memory-off ablation); positions still continue.
        Memory is stop-gradient: no gradient reaches an earlier segment.
        """
        memory = memory or self.empty_memory()
        T = tokens_BT.shape[1]
        positions = torch.arange(memory.next_pos, memory.next_pos + T, device=tokens_BT.device)
        mode = RECURRENCE[self.cfg.recurrence] if use_memory and self.cfg.mem_len else None
        mem_u = memory.universal if mode and memory.universal[0] is not None else None
        mem_g = memory.nlg if mode and memory.nlg[0] is not None else None
        u = self.universal(self.drop(self.tok_emb(tokens_BT)), positions, memory=mem_u, return_states=mode)
        g = self.nlg(self.proj(u.hidden), positions, memory=mem_g, return_states=mode)
        if mode is None:
            return g.hidden, Ernie3Memory(memory.universal, memory.nlg, memory.next_pos + T)
        L_u, L_g = self.cfg.n_layers, self.cfg.task_layers
        new = Ernie3Memory([next_memory(memory.universal[i], u.states[i], self.cfg.mem_len) for i in range(L_u)],
                           [next_memory(memory.nlg[i], g.states[i], self.cfg.mem_len) for i in range(L_g)],
                           memory.next_pos + T)
        return g.hidden, new

    # -- one entry point per task (FSDP2 gathers the root's parameters around `forward`) ------------

    def forward(self, tokens: torch.Tensor, task: str = "mlm", valid: Optional[torch.Tensor] = None,
                memory: Optional[Ernie3Memory] = None, use_memory: bool = True, head: Optional[str] = None):
        """task 'mlm': masked-token logits [B, T, V] (knowledge-masked LM, UKTP); 'reorder' /
        'distance' / 'cls': class logits [B, K] from the NLU [CLS] state (`head` names the
        classifier attribute for 'cls'); 'lm': (next-token logits [B, T, V], next memory) of one
        document segment; 'nlu': the NLU representation [B, T, D]."""
        if task == "lm":
            h, memory = self.forward_nlg(tokens, memory, use_memory)
            return self.lm_head(h), memory
        if task == "nlu":
            return self.forward_nlu(tokens, valid)
        if task == "mlm":
            return self.mlm_logits(tokens, valid)
        heads = {"reorder": "reorder_head", "distance": "distance_head", "cls": head}
        if task not in heads or heads[task] is None:
            raise ValueError(f"unknown task {task!r} (mlm | lm | nlu | reorder | distance | cls with head=)")
        return self.cls_logits(getattr(self, heads[task]), tokens, valid)

    # -- heads -------------------------------------------------------------------------------------

    def mlm_logits(self, tokens_BT, valid_BT=None) -> torch.Tensor:
        return self.mlm_head(self.forward_nlu(tokens_BT, valid_BT))

    def cls_logits(self, head: nn.Module, tokens_BT, valid_BT=None) -> torch.Tensor:
        """A sequence classifier on the NLU representation of the first ([CLS]) token."""
        return head(self.forward_nlu(tokens_BT, valid_BT)[:, 0])

    # -- generation (NLG module, KV cache) ---------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> tuple[list[LayerKVCache], list[LayerKVCache]]:
        return self.universal.new_cache(batch, max_len), self.nlg.new_cache(batch, max_len)

    def nlg_step(self, tokens_BT: torch.Tensor, cache, start: int) -> torch.Tensor:
        """LM logits of tokens at positions start.. with both modules' KV caches (causal)."""
        cu, cg = cache
        for c in (*cu, *cg):
            c.length = start
        positions = torch.arange(start, start + tokens_BT.shape[1], device=tokens_BT.device)
        u = self.universal(self.tok_emb(tokens_BT), positions, cache=cu)
        return self.lm_head(self.nlg(self.proj(u.hidden), positions, cache=cg).hidden)

    @torch.no_grad()
    def generate(self, prompt_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 eos_id: Optional[int] = None, use_cache: bool = True) -> torch.Tensor:
        """Sample a continuation with the NLG module; temperature 0 is greedy. Returns prompt + new tokens."""
        from models.transformer import sample_next

        total = prompt_BT.shape[1] + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.cfg.max_seq_len}")
        was_training = self.training
        self.eval()
        out = prompt_BT
        done = torch.zeros(prompt_BT.shape[0], dtype=torch.bool, device=prompt_BT.device)
        cache = self.new_cache(prompt_BT.shape[0], total) if use_cache else None
        logits = self.nlg_step(prompt_BT, cache, 0)[:, -1] if use_cache else None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self.lm_head(self.forward_nlg(out, use_memory=False)[0])[:, -1]
            nxt = sample_next(logits.float(), temperature, top_k, None, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if use_cache and out.shape[1] < total:
                logits = self.nlg_step(nxt[:, None], cache, out.shape[1] - 1)[:, -1]
        self.train(was_training)
        return out


def masked_ce(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over positions with a target (!= -100), accuracy there), float32."""
    flat, tgt = logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1)
    loss = F.cross_entropy(flat, tgt, ignore_index=-100)
    keep = tgt != -100
    acc = (flat.argmax(-1)[keep] == tgt[keep]).float().mean() if keep.any() else flat.new_zeros(())
    return loss, acc

