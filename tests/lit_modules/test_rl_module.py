"""SFT and RL LightningModules on verifiable tasks: data layout, one-step mechanics, replay, U-RB, resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from datamodules.tasks import PromptBatch, TaskDataModule, stop_token_ids
from lit_modules.rl import RLConfig, RLModule, build_rl_batch, hint_text
from lit_modules.sft import SFTModule
from models.tokenizers.text import build_tokenizer
from tests.helpers import resume_trainer

TINY_NET = {"preset": "tiny", "max_seq_len": 96}
SPARSE_NET = {**TINY_NET, "ffn": "moe", "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}}


def dm(mode: str = "rl", **kw) -> TaskDataModule:
    args = dict(task="arithmetic", mode=mode, n_train=64, n_eval=6, max_digits=2, seq_len=48, batch_size=4,
                prompts_per_step=2, seed=0)
    args.update(kw)
    return TaskDataModule(**args)


def rl_module(net=None, **rl) -> RLModule:
    cfg = {"group_size": 4, "max_new_tokens": 5, **rl}
    return RLModule(net=net or TINY_NET, rl=cfg, optim={"lr": 1e-3, "warmup_steps": 0, "total_steps": 8},
                    evaluate={"max_new_tokens": 5}, seed=3)


class Record(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        group = getattr(module, "last_rollout", None)
        rl = module.last_rl
        self.steps.append({"index": batch.index.tolist(), "loss": None if rl is None else rl["loss"], "rl": rl,
                           "group": group})


def fit(module, data, steps: int, callbacks=()):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, max_steps=steps, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer


# ------------------------------------------------------------------------------------------ data


def test_sft_rows_train_only_on_answer_tokens():
    data = dm("sft")
    data.setup("fit")
    tok = data.tokenizer
    batch = next(iter(data.train_dataloader()))
    assert batch.tokens.shape == (4, 48)
    text_targets = tok.decode([t for t in batch.targets.flatten().tolist() if t != -100])
    # every supervised character is an answer or its end marker: digits, spaces and newlines
    assert text_targets and set(text_targets) <= set("0123456789 \n")
    # and every answer of the packed demonstrations is supervised in full
    row = batch.tokens[0].tolist() + [batch.targets[0, -1].item()]
    assert (batch.targets != -100).sum() > 0
    val = next(iter(data.val_dataloader()))
    for tokens, targets in zip(val.tokens, val.targets):
        kept = [t for t in targets.tolist() if t != -100]
        assert tok.decode(kept).endswith("\n") and tok.decode(kept).strip().lstrip("-").isdigit()
    del row


def test_prompt_batches_and_stop_ids():
    data = dm("rl")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, PromptBatch) and batch.index.shape == (2,)
    tok = build_tokenizer("byte")
    assert stop_token_ids(tok) == sorted({tok.eos_id, *tok.encode("\n")})
    ids = data.prompt_ids(data.train_tasks[0], hint="4+3=7")
    assert ids[0] == tok.eos_id and tok.decode(ids[1:]).startswith("4+3=7\nQ: ")


def test_task_datamodule_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.task='poetry'"):
        TaskDataModule(task="poetry")
    with pytest.raises(ValueError, match="data.train_path and data.eval_path"):
        TaskDataModule(task="jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q: 1+1=? A:", "answer": 2}) + "\n{oops\n")
    data = TaskDataModule(task="jsonl", train_path=str(bad), eval_path=str(bad))
    with pytest.raises(ValueError, match=f"{bad}:2"):
        data.setup("fit")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        ckpt = tmp_path / "x.ckpt"
        torch.save({"state_dict": {}}, ckpt)
        TaskDataModule(tokenizer_ckpt=str(ckpt)).setup("fit")


def test_build_rl_batch_aligns_response_positions():
    out = build_rl_batch([[0, 5, 6], [0, 7]], [[8, 9, 1], [4]], pad_id=0,
                         rollout_logp=[torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0])],
                         routes=[{0: torch.arange(10).view(5, 2)}, {0: torch.arange(2).view(1, 2)}])
    assert out["tokens"].tolist() == [[0, 5, 6, 8, 9], [0, 7, 0, 0, 0]]
    assert out["targets"][0].tolist() == [5, 6, 8, 9, 1] and out["targets"][1, :2].tolist() == [7, 4]
    assert out["mask"].tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    assert out["logp_rollout"][0, 2:].tolist() == [-1.0, -2.0, -3.0] and out["logp_rollout"][1, 1] == -4.0
    assert out["routes"][0].shape == (2, 5, 2) and out["routes"][0][1, 1:].tolist() == [[0, 1]] * 4


def test_hint_text_cuts_at_words():
    sol = "8-6=2, write 2; 4-0=4, write 4. So 48-6=42"
    assert hint_text(sol, 0.0) == "" and hint_text(sol, 1.0) == sol
    h = hint_text(sol, 0.5)
    assert sol.startswith(h) and 0 < len(h) <= len(sol) // 2 + 1 and not h.endswith(" ")


def test_rl_config_names_bad_keys():
    with pytest.raises(ValueError, match="model.rl.objective='ppo'"):
        RLConfig(objective="ppo")
    with pytest.raises(ValueError, match=r"unknown model.rl keys \['bogus'\]"):
        RLConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="routing_replay=R3 needs a sparse policy"):
        module = rl_module(routing_replay="R3")
        fit(module, dm(), 1)


# ------------------------------------------------------------------------------------------ modules


def test_sft_trains_and_scores_held_out_tasks(tmp_path):
    module = SFTModule(net=TINY_NET, optim={"lr": 1e-3, "warmup_steps": 0}, evaluate={"max_new_tokens": 4})
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                        val_check_interval=3, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm("sft"))
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and 0.0 <= float(m["val/acc"]) <= 1.0
    assert {"val/format", "val/acc/addition", "val/acc/subtraction", "val/response_len"} <= set(m)
    assert module.hparams["net"]["preset"] == "tiny" and module.last_eval["examples"]

    # the checkpoint stands alone: generate.py loads it (architecture and tokenizer inside) and so does RL
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    import generate

    loaded = generate.load_module(tmp_path / "sft.ckpt")
    assert isinstance(loaded, SFTModule) and loaded.generate_text(["Q: 1+1=? A:"], max_new_tokens=3)[0]
    policy = RLModule(init_ckpt=str(tmp_path / "sft.ckpt"), net={"max_seq_len": 64})
    assert policy.net_cfg.d_model == module.net_cfg.d_model and policy.net_cfg.max_seq_len == 64
    assert policy.net_cfg.dropout == 0.0


@pytest.mark.parametrize("objective", ["grpo", "gspo_icepop", "mixed_icepop"])
def test_one_rl_step_measures_and_updates(objective):
    module = rl_module(objective=objective, wpsm=True, kl_coef=0.1, entropy_coef=0.01, rollout_dtype="bf16")
    rec = Record()
    fit(module, dm(), 2, callbacks=[rec])
    info = rec.steps[-1]["rl"]
    for key in ("reward", "acc", "format", "response_len", "entropy", "clip_frac", "icepop_masked_frac",
                "mismatch_k_mean", "mismatch_k_max", "mismatch_kl", "kl_ref", "wpsm_frac", "rollout_s", "update_s"):
        assert key in info and info[key] == info[key], key
    assert info["router_disagreement"] is None and info["expert_load"] is None
    # bf16 rollouts differ from the fp32 training engine: a real mismatch
    assert info["mismatch_kl_k3"] > 0
    assert module.global_step == 2


def test_rl_changes_the_policy_and_minibatches_count_as_steps():
    module = rl_module(minibatches=2)
    rec = Record()
    fit(module, dm(), 4, callbacks=[rec])
    assert module.global_step == 4 and len(rec.steps) == 2  # two rollout batches x two optimiser steps
    # the rollout copy holds the policy's weights as of the second batch's rollouts; two updates moved them
    policy = module.model.state_dict()
    assert any(not torch.equal(policy[k], v) for k, v in module.rollout_net.state_dict().items())


@pytest.mark.parametrize("replay", ["off", "R2", "R3"])
def test_sparse_policy_routing_replay_and_monitors(replay):
    from callbacks.rl_monitor import RLMonitor

    module = rl_module(SPARSE_NET, routing_replay=replay, minibatches=2 if replay == "R2" else 1,
                       rollout_dtype="bf16")
    mon = RLMonitor(entropy_floor=100.0)  # any entropy counts as collapsed: the warning path runs
    with pytest.warns(UserWarning, match="entropy collapse"):
        fit(module, dm(), 2, callbacks=[mon])
    h = mon.history[-1]
    assert {"rl/router_disagreement/layer_0", "rl/router_disagreement/layer_1", "rl/expert_load/max_share",
            "rl/rollout_share", "rl/entropy_collapsed"} <= set(h)
    assert h["rl/entropy_collapsed"] == 1.0
    assert 0.0 <= h["rl/router_disagreement/mean"] <= 1.0
    assert module.expert_usage is not None and module.expert_usage.sum() > 0


def test_r3_replays_exactly_the_rollout_routes():
    """With an fp32 rollout copy of the same weights, the training forward's own routes equal the rollout's."""
    from callbacks.rl_monitor import RLMonitor

    for replay in ("off", "R3"):
        module = rl_module(SPARSE_NET, routing_replay=replay)
        mon = RLMonitor(entropy_floor=None)
        fit(module, dm(), 1, callbacks=[mon])
        assert mon.history[-1]["rl/router_disagreement/mean"] == 0.0


def test_urb_trains_groups_in_query_order_after_the_lag():
    module = rl_module(urb_groups_ahead=1)
    rec = Record()
    fit(module, dm(), 3, callbacks=[rec])
    # step 0 only fills the pipeline; batch b trains the group sampled at batch b - 1
    assert rec.steps[0]["rl"] is None and module.global_step == 3 and len(rec.steps) == 4
    for prev, cur in zip(rec.steps, rec.steps[1:]):
        assert cur["group"]["index"] == prev["index"]


def test_ahrl_measures_pass_at_g_and_hints_hard_queries():
    module = rl_module(hints=True, hint_p_initial=1.0, hint_gamma=0.0)
    rec = Record()
    fit(module, dm(), 1, callbacks=[rec])
    assert module.pass_initial is not None and module.pass_initial.shape == (64,)
    info = rec.steps[-1]["rl"]
    assert info["hint_frac"] == 1.0  # gamma 0: every query keeps its full hint
    group = rec.steps[-1]["group"]
    assert group["hints"][0] and module.trainer.datamodule.train_tasks[group["index"][0]].solution == group["hints"][0]


@pytest.mark.parametrize("urb", [0, 1])
def test_resume_reproduces_rollouts_and_losses(tmp_path, urb):
    from callbacks.checkpoint import ModelCheckpoint

    def run(steps, ckpt=None, save=False):
        rec = Record()
        cbs = [rec]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0))
        L.seed_everything(0)  # the initial weights (train.py seeds every run)
        module = rl_module(urb_groups_ahead=urb, hints=True)
        trainer = resume_trainer(max_steps=steps, callbacks=cbs, default_root_dir=tmp_path / "root")
        trainer.fit(module, datamodule=dm(), ckpt_path=ckpt, weights_only=True)
        return rec.steps

    full = run(4)
    first = run(2, save=True)
    second = run(4, ckpt=str(tmp_path / "last.ckpt"))
    resumed = first + second
    key = lambda s: (s["index"], None if s["group"] is None else s["group"]["responses"], s["loss"])  # noqa: E731
    assert [key(s) for s in full] == [key(s) for s in resumed]
