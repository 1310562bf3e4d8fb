"""RL step cost: batched KV-cached rollouts against uncached sampling, and where a step's time goes.

1. Rollout throughput: `models.rollout.sample_responses` with the KV cache (one prefill per prompt-length
   group, then one single-token forward per new token, all rows of a group together) against
   `use_cache=False` (every new token re-runs the whole prefix), on the same network, prompts and
   generator seed. The sampled tokens must be identical and the log-probs equal to float32 rounding.
   Tokens/s counts generated response tokens (stop tokens included). A/B timings alternate in one
   process (order flipped each pair); ratios are medians of per-pair ratios; a cached-vs-cached pair
   gives the A/A noise floor. No stop token is ever sampled here (stop_ids name an id outside the
   vocabulary), so
   both paths generate exactly max_new_tokens per row: the comparison is per token, not per answer.
2. Step breakdown: `lit_modules.rl.RLModule` training steps (rollout copy refresh + sampling + scoring,
   then the policy update) on the embedded arithmetic task; the share of each step spent in rollout
   vs update, from the module's own timers, medians over steps after a warm-up step.

    python benchmarks/rl_step.py            # prints one JSON object
    python benchmarks/rl_step.py --quick    # smoke run (tiny preset, few steps)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from models.rollout import sample_responses  # noqa: E402
from models.transformer import Transformer, TransformerConfig  # noqa: E402


def rollout_throughput(preset: str, rows: int, prompt_len: int, new_tokens: int, repeats: int, ffn: str) -> dict:
    torch.manual_seed(0)
    net_cfg = dict(preset=preset, vocab_size=512, ffn=ffn, max_seq_len=prompt_len + new_tokens + 1)
    if ffn != "dense":
        net_cfg["moe"] = {"num_experts": 8, "top_k": 2, "expert_hidden": 64}
    net = Transformer(TransformerConfig.from_dict(net_cfg)).eval()
    with torch.no_grad():  # jitter the init so samples vary
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    gen_prompts = torch.Generator().manual_seed(1)
    # two prompt lengths: the sampler decodes each length group as one batch
    prompts = [[0] + torch.randint(2, 512, (prompt_len - (i % 2),), generator=gen_prompts).tolist()
               for i in range(rows)]
    stop = [512]  # outside the vocabulary: never sampled, every row generates new_tokens

    def run(use_cache: bool):
        return sample_responses(net, prompts, new_tokens, stop, generator=torch.Generator().manual_seed(5),
                                use_cache=use_cache)

    cached, uncached = run(True), run(False)
    equal = cached.responses == uncached.responses
    diff = max(float((a - b).abs().max()) for a, b in zip(cached.logp, uncached.logp))
    ta, tb = alternate(lambda: run(True), lambda: run(False), repeats)
    ratios = [b / a for a, b in zip(ta, tb)]
    aa_a, aa_b = alternate(lambda: run(True), lambda: run(True), repeats)
    aa = [b / a for a, b in zip(aa_a, aa_b)]
    tokens = cached.generated_tokens
    return {
        "config": {"preset": preset, "ffn": ffn, "rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "length_groups": 2, "repeats": repeats},
        "tokens_equal": equal,
        "max_abs_logp_diff": diff,
        "generated_tokens": tokens,
        "network_calls": {"cached": cached.decode_steps, "uncached": uncached.decode_steps},
        "tokens_per_s_cached": tokens / statistics.median(ta),
        "tokens_per_s_uncached": tokens / statistics.median(tb),
        "speedup_cached_over_uncached": statistics.median(ratios),
        "speedup_spread": [min(ratios), max(ratios)],
        "aa_cached_over_cached": {"ratio": statistics.median(aa), "spread": [min(aa), max(aa)]},
    }


def step_breakdown(preset: str, steps: int, group_size: int, prompts_per_step: int, ffn: str) -> dict:
    import lightning as L

    from datamodules.tasks import TaskDataModule
    from lit_modules.rl import RLModule

    L.seed_everything(0, verbose=False)
    net = {"preset": preset, "ffn": ffn}
    if ffn != "dense":
        net["moe"] = {"num_experts": 8, "top_k": 2, "expert_hidden": 64}
    module = RLModule(net=net, rl={"group_size": group_size, "max_new_tokens": 8},
                      optim={"lr": 1e-4, "warmup_steps": 0, "total_steps": steps})
    data = TaskDataModule(task="arithmetic", mode="rl", n_train=256, n_eval=8, prompts_per_step=prompts_per_step)
    records = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.last_rl is not None:
                records.append(dict(pl_module.last_rl))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Rec()])
    trainer.fit(module, datamodule=data)
    rec = records[1:] or records  # the first step pays one-time costs
    med = lambda k: statistics.median(r[k] for r in rec)  # noqa: E731
    return {
        "config": {"preset": preset, "ffn": ffn, "steps": steps, "group_size": group_size,
                   "prompts_per_step": prompts_per_step, "responses_per_step": group_size * prompts_per_step},
        "step_s": med("step_s"),
        "rollout_s": med("rollout_s"),
        "update_s": med("update_s"),
        "rollout_share": statistics.median(r["rollout_s"] / r["step_s"] for r in rec),
        "update_share": statistics.median(r["update_s"] / r["step_s"] for r in rec),
        "rollout_tokens_per_step": med("rollout_tokens"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--ffn", default="dense", choices=["dense", "moe"])
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    if args.quick:
        roll = rollout_throughput("tiny", rows=8, prompt_len=8, new_tokens=6, repeats=3, ffn=args.ffn)
        step = step_breakdown("tiny", steps=3, group_size=4, prompts_per_step=2, ffn=args.ffn)
    else:
        roll = rollout_throughput("small", rows=32, prompt_len=16, new_tokens=32, repeats=7, ffn=args.ffn)
        step = step_breakdown("small", steps=8, group_size=8, prompts_per_step=4, ffn=args.ffn)
    out = {
        "benchmark": "rl_step",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rollout": roll,
        "step": step,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
