"""Verifiable-task data for SFT and RL (`data=tasks`): demonstrations, prompts and held-out evaluation sets.

Built on `datamodules.rl_tasks` (arithmetic, biography questions, JSONL files). The tokenizer is the one
the policy was pre-trained with, read from `tokenizer_ckpt` (experiments set it to `${model.init_ckpt}`);
without a checkpoint the byte tokenizer is used (training from scratch).

Every sequence starts with the tokenizer's EOS token (as a packed pre-training document does), then the
prompt, then for demonstrations the target (" answer" + END_MARKER).

mode "sft": training rows are demonstrations packed back to back into windows of `seq_len` tokens, the
    loss only on target tokens (the others' targets are -100); attention runs across the packed
    demonstrations like pre-training's packed documents.
mode "rl": a training batch is `prompts_per_step` (global) indices of training tasks (`PromptBatch`); the
    module samples, scores and trains on its own responses.
val / test (both modes): held-out demonstrations, one per row (right-padded, targets -100 on padding),
    for the answer NLL; `eval_tasks` (the first `n_eval` held-out tasks) for generation accuracy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batch import LMBatch
from datamodules.resumable import ResumableDataModule
from datamodules.rl_tasks import (END_MARKER, Task, arithmetic_tasks, demonstration, knowledge_tasks,
                                  load_jsonl_tasks)
from datamodules.synthetic_bios import generate_biographies

__all__ = ["PromptBatch", "TaskDataModule", "encode_demonstration", "stop_token_ids"]

log = logging.getLogger(__name__)

TASKS = ("arithmetic", "knowledge", "jsonl")
MODES = ("sft", "rl")


@dataclass
class PromptBatch:
    """Indices [B] of training tasks (`TaskDataModule.train_tasks`) a step samples responses for."""

    index: torch.Tensor

    def __len__(self) -> int:
        return self.index.shape[0]

    def to(self, *args, **kwargs) -> "PromptBatch":
        return PromptBatch(self.index.to(*args, **kwargs))


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains END_MARKER: a response ends at the first of them."""
    ids = {tokenizer.eos_id}
    for t in range(tokenizer.vocab_size):
        if END_MARKER in tokenizer.decode([t]):
            ids.add(t)
    return sorted(ids)


def encode_demonstration(tokenizer, task: Task) -> tuple[list[int], list[int]]:
    """(prompt ids with the leading EOS, target ids) of a task's demonstration."""
    prompt, target = demonstration(task)
    return [tokenizer.eos_id] + tokenizer.encode(prompt), tokenizer.encode(target)


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Rows(Dataset):
    def __init__(self, rows: list[tuple[list[int], list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def _pad_demonstrations(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> LMBatch:
    """One demonstration per row: tokens = prompt + target[:-1], targets = -100 on the prompt, the target after."""
    seqs = [(p + t, [-100] * (len(p) - 1) + t) for p, t in rows]
    T = max(len(s) - 1 for s, _ in seqs)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (s, tg) in enumerate(seqs):
        tokens[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, :len(tg)] = torch.tensor(tg)
    return LMBatch(tokens, targets)


def _collate_prompts(indices: list[int]) -> PromptBatch:
    return PromptBatch(torch.tensor(indices, dtype=torch.long))


class _Packed(Dataset):
    """Demonstrations concatenated into one stream, cut into windows of seq_len + 1 (the tail is dropped)."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], seq_len: int):
        stream, keep = [], []
        for p, t in rows:
            stream += p + t
            keep += [False] * len(p) + [True] * len(t)
        n = len(stream) // (seq_len + 1)
        if n == 0:
            raise ValueError(f"the demonstrations hold {len(stream)} tokens, fewer than one window of "
                             f"data.seq_len + 1 = {seq_len + 1}")
        self.tokens = torch.tensor(stream[:n * (seq_len + 1)]).view(n, seq_len + 1)
        self.keep = torch.tensor(keep[:n * (seq_len + 1)]).view(n, seq_len + 1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict:
        w, k = self.tokens[i], self.keep[i]
        return {"tokens": w[:-1], "targets": torch.where(k[1:], w[1:], torch.full_like(w[1:], -100))}


class TaskDataModule(ResumableDataModule):
    """Tasks, splits and loaders for SFT and RL (see the module docstring).

    task: arithmetic | knowledge | jsonl. n_train / n_eval: training tasks (arithmetic; knowledge and jsonl
    take all, capped by n_train when > 0) and held-out tasks scored by generation at each validation.
    arithmetic: min_digits, max_digits, ops. knowledge: num_people, corpus_seed, train_templates (the
    corpus the policy was pre-trained on: data=text's defaults), held_out (templates | people),
    held_out_template. jsonl: train_path, eval_path, verifier (exact | numeric).
    batch_size: global SFT rows per step; prompts_per_step: global prompts per RL step.
    """

    def __init__(
        self,
        task: str = "arithmetic",
        mode: str = "sft",
        tokenizer_ckpt: Optional[str] = None,
        n_train: int = 2000,
        n_eval: int = 128,
        task_seed: int = 0,
        held_out_fraction: float = 0.2,
        min_digits: int = 1,
        max_digits: int = 2,
        ops: list[str] = ["+", "-"],  # noqa: B006 (a config default, copied by the schema)
        num_people: int = 2000,
        corpus_seed: int = 0,
        train_templates: Optional[list[int]] = None,
        held_out: str = "templates",
        held_out_template: int = -1,
        train_path: Optional[str] = None,
        eval_path: Optional[str] = None,
        verifier: str = "exact",
        seq_len: int = 128,
        batch_size: int = 16,
        prompts_per_step: int = 4,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if task not in TASKS:
            raise ValueError(f"data.task={task!r} is not one of {list(TASKS)}")
        if mode not in MODES:
            raise ValueError(f"data.mode={mode!r} is not one of {list(MODES)}")
        if task == "jsonl" and not (train_path and eval_path):
            raise ValueError("data.task=jsonl needs data.train_path and data.eval_path (JSONL files of "
                             '{"prompt": ..., "answer": ...} lines)')
        for key, value in (("n_eval", n_eval), ("seq_len", seq_len), ("batch_size", batch_size),
                           ("prompts_per_step", prompts_per_step)):
            if value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        if n_train < 0:
            raise ValueError(f"data.n_train must be >= 0 (0 = all), got {n_train}")
        self.task, self.mode, self.tokenizer_ckpt = task, mode, tokenizer_ckpt
        self.seq_len, self.seed, self.num_workers = seq_len, seed, num_workers
        # the sampler divides the global batch: SFT rows or RL prompts
        self.batch_size = batch_size if mode == "sft" else prompts_per_step
        self.tokenizer = None
        self.train_tasks: list[Task] = []
        self.held_out_tasks: list[Task] = []
        self.eval_tasks: list[Task] = []
        self.stop_ids: list[int] = []

    # -- building -----------------------------------------------------------------------------

    def _make_tasks(self) -> tuple[list[Task], list[Task]]:
        h = self.hparams
        if self.task == "arithmetic":
            kw = dict(seed=h.task_seed, min_digits=h.min_digits, max_digits=h.max_digits, ops=list(h.ops),
                      held_out_fraction=h.held_out_fraction)
            try:
                train = arithmetic_tasks(h.n_train, "train", **kw)
                held = arithmetic_tasks(h.n_eval, "held_out", **kw)
            except ValueError as e:
                raise ValueError(f"data (task=arithmetic): {e}") from e
            return train, held
        if self.task == "knowledge":
            bios = generate_biographies(h.num_people, h.corpus_seed, h.train_templates)
            kw = dict(held_out=h.held_out, seed=h.task_seed, held_out_fraction=h.held_out_fraction,
                      held_out_template=h.held_out_template)
            try:
                train, held = knowledge_tasks(bios, "train", **kw), knowledge_tasks(bios, "held_out", **kw)
            except ValueError as e:
                raise ValueError(f"data (task=knowledge): {e}") from e
            return (train[:h.n_train] if h.n_train else train), held
        train = load_jsonl_tasks(h.train_path, h.verifier)
        return (train[:h.n_train] if h.n_train else train), load_jsonl_tasks(h.eval_path, h.verifier)

    def _load_tokenizer(self):
        from models.tokenizers.text import build_tokenizer

        if not self.tokenizer_ckpt:
            log.info("data.tokenizer_ckpt is null: using the byte tokenizer (a policy trained from scratch)")
            return build_tokenizer("byte")
        from lit_modules.lm import tokenizer_from_state
        from models.io import load_checkpoint

        ckpt = load_checkpoint(self.tokenizer_ckpt, what="data.tokenizer_ckpt checkpoint")
        if "tokenizer" not in ckpt:
            raise ValueError(f"data.tokenizer_ckpt={self.tokenizer_ckpt} holds no tokenizer (a language-model "
                             "checkpoint written by this project has one)")
        return tokenizer_from_state(ckpt["tokenizer"])

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is not None:
            return
        self.train_tasks, self.held_out_tasks = self._make_tasks()
        if self.mode == "rl" and not self.train_tasks:
            raise ValueError("data: no training tasks (raise data.n_train)")
        self.eval_tasks = self.held_out_tasks[:self.hparams.n_eval]
        self.tokenizer = self._load_tokenizer()
        self.stop_ids = stop_token_ids(self.tokenizer)
        tok = self.tokenizer
        self._train_rows = [encode_demonstration(tok, t) for t in self.train_tasks]
        self._eval_rows = [encode_demonstration(tok, t) for t in self.eval_tasks]
        log.info("tasks: %d train, %d held-out (%d scored by generation), task=%s, mode=%s",
                 len(self.train_tasks), len(self.held_out_tasks), len(self.eval_tasks), self.task, self.mode)

    def prompt_ids(self, task: Task, hint: str = "") -> list[int]:
        """The token ids a policy is prompted with: EOS, then the optional hint line, then the prompt."""
        text = (hint + END_MARKER if hint else "") + task.prompt
        return [self.tokenizer.eos_id] + self.tokenizer.encode(text)

    # -- loaders ------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        if self.mode == "sft":
            data = _Packed(self._train_rows, self.seq_len)
            from datamodules.batch import collate_lm

            collate = collate_lm
        else:
            data, collate = _Indices(len(self.train_tasks)), _collate_prompts
        sampler = self._make_train_sampler(
            len(data), f"data: {len(data)} training items cannot fill one batch of {self.per_rank_batch_size()} per "
                       "rank (lower data.batch_size / data.prompts_per_step or add tasks)")
        return DataLoader(data, batch_size=self.per_rank_batch_size(), sampler=sampler, drop_last=True,
                          collate_fn=collate, num_workers=self.num_workers)

    def _eval_loader(self) -> DataLoader:
        pad = self.tokenizer.pad_id
        bs = max(1, min(32, len(self._eval_rows)))
        return DataLoader(_Rows(self._eval_rows), batch_size=bs, sampler=self._make_eval_sampler(len(self._eval_rows)),
                          collate_fn=lambda rows: _pad_demonstrations(rows, pad), num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()
