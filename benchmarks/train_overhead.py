"""Lightning overhead: the same LM trained by a plain PyTorch loop and by LanguageModelModule + Trainer.

Both runs start from the same weights, read the same batches in the same order, re-seed dropout
the same way per step and use the same optimiser, schedule and clipping, so their per-step losses
must be identical. They alternate in one process; steady-state steps/s is timed from the start of
step 1 to the end of the last step (step 0 warms up allocators and caches in both). A second plain
run in each pair gives the A/A noise floor.

    python benchmarks/train_overhead.py            # prints one JSON object
    python benchmarks/train_overhead.py --steps 5 --repeats 1 --preset tiny   # quick mode
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.text import TextDataModule  # noqa: E402
from lit_modules.base import OptimConfig, param_groups, seed_step  # noqa: E402
from lit_modules.lm import LanguageModelModule  # noqa: E402
from models.transformer import Transformer, TransformerConfig, lm_loss  # noqa: E402


class _Recorder(L.Callback):
    """Per-step losses and the steady-state timing window, as the plain loop records them."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.losses) == 1:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.t1 = time.perf_counter()


def plain_run(net_cfg: dict, optim: OptimConfig, init_state: dict, dm: TextDataModule, steps: int, seed: int):
    model = Transformer(TransformerConfig.from_dict(net_cfg))
    model.load_state_dict(init_state)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    total = optim.total_steps or steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.lr_lambda(total))
    losses, t0 = [], 0.0
    loader = dm.train_dataloader()
    step = 0
    while step < steps:
        loader.sampler.set_epoch(step // max(1, len(loader)))
        for batch in loader:
            if step == 1:
                t0 = time.perf_counter()
            seed_step(seed, step, 0)
            loss = lm_loss(model(batch.tokens), batch.targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # same parameter order as the module's clipping (optimiser groups), so the norm is bit-identical
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], optim.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    return losses, (steps - 1) / (time.perf_counter() - t0)


def lightning_run(net_cfg: dict, optim_cfg: dict, init_state: dict, dm: TextDataModule, steps: int, seed: int, root: str):
    module = LanguageModelModule(net=net_cfg, optim=optim_cfg, seed=seed, sample={"max_new_tokens": 0})
    module.configure_model()
    module.model.load_state_dict(init_state)
    rec = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[rec], default_root_dir=root,
    )
    trainer.fit(module, datamodule=dm)
    return rec.losses, (steps - 1) / (rec.t1 - rec.t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = tempfile.mkdtemp(prefix="bench_overhead_")
    cache = args.cache_dir or os.path.join(root, "cache")
    dm = TextDataModule(
        source="bios", num_people=400, tokenizer="byte", seq_len=args.seq_len, batch_size=args.batch_size,
        seed=args.seed, cache_dir=cache,
    )
    dm.prepare_data()
    dm.setup("fit")
    net_cfg = dict(preset=args.preset, vocab_size=dm.tokenizer.vocab_size, dropout=args.dropout, max_seq_len=args.seq_len)
    optim_cfg = dict(lr=1e-3, warmup_steps=5, total_steps=args.steps)
    torch.manual_seed(args.seed)
    init_state = {k: v.clone() for k, v in Transformer(TransformerConfig.from_dict(net_cfg)).state_dict().items()}
    optim = OptimConfig.from_dict(optim_cfg)

    ratios, aa, loss_diffs, plain_sps, light_sps = [], [], [], [], []
    for i in range(args.repeats):
        # A-B then B-A on alternate repeats, so a drift within a repeat (allocator, caches, other
        # load) biases neither side; the A/A pair measures the noise floor the same way.
        first_plain = i % 2 == 0
        if first_plain:
            pl_losses, sps_plain = plain_run(net_cfg, optim, init_state, dm, args.steps, args.seed)
        lt_losses, sps_light = lightning_run(net_cfg, optim_cfg, init_state, dm, args.steps, args.seed, root)
        if not first_plain:
            pl_losses, sps_plain = plain_run(net_cfg, optim, init_state, dm, args.steps, args.seed)
        _, sps_a = plain_run(net_cfg, optim, init_state, dm, args.steps, args.seed)
        _, sps_b = plain_run(net_cfg, optim, init_state, dm, args.steps, args.seed)
        ratios.append(sps_light / sps_plain)
        aa.append(sps_b / sps_a)
        plain_sps.append(sps_plain)
        light_sps.append(sps_light)
        loss_diffs.append(max(abs(a - b) for a, b in zip(pl_losses, lt_losses)) if len(pl_losses) == len(lt_losses) else float("inf"))

    def spread(xs):
        return [min(xs), max(xs)]

    result = {
        "benchmark": "train_overhead",
        "ratio_lightning_over_plain": statistics.median(ratios),
        "ratio_spread": spread(ratios),
        "aa_ratio_plain_over_plain": statistics.median(aa),
        "aa_spread": spread(aa),
        "max_abs_loss_diff": max(loss_diffs),
        "steps_per_sec": {"plain": statistics.median(plain_sps), "lightning": statistics.median(light_sps)},
        "config": {**vars(args), "params": sum(v.numel() for v in init_state.values())},
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
