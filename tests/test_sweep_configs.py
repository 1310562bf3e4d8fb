"""The sweep configs of issue 16 compose into the runs they promise: conf/hparams_search/token_sufficient.yaml
with each conf/lm_size preset gives dense / MoE / MoUE of equal activated parameters (MoE and MoUE of equal
totals), all three trained on the same tokens, at least 20 per total parameter, from a corpus that does not
repeat within a run; conf/hparams_search/knowledge_capacity.yaml reads every fact as often whatever the
number of people."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from models.transformer import Transformer, TransformerConfig
from tests.conftest import compose_train_cfg


def _counts(cfg) -> dict[str, int]:
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    net["vocab_size"] = cfg.data.vocab_size  # what the BPE tokenizer trained to data.vocab_size gives
    return Transformer(TransformerConfig.from_dict(net)).num_params()


def test_token_sufficient_sweep_declares_every_size_family_and_seed(tmp_path):
    cfg = compose_train_cfg(["hparams_search=token_sufficient"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert params["+lm_size"] == "s,m,l" and params.experiment == "dense_lm,moe_lm,moue_lm" and params.seed == "0,1,2"
    assert cfg.callbacks.fact_recall._target_ == "callbacks.fact_recall.FactRecall"
    assert "csv" in cfg.logger and list(cfg.data.train_templates) == [0, 1, 2]


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_token_sufficient_sizes_are_matched_and_token_sufficient(tmp_path, size):
    runs = {}
    for exp in ("dense_lm", "moe_lm", "moue_lm"):
        cfg = compose_train_cfg(["hparams_search=token_sufficient", f"+lm_size={size}", f"experiment={exp}"], tmp_path)
        runs[exp] = (cfg, _counts(cfg))
    dense, moe, moue = (runs[e][1] for e in ("dense_lm", "moe_lm", "moue_lm"))
    # equal activated parameters up to the routers (< 4%); MoE and MoUE equal totals up to the MoUE router and state (< 2%)
    assert moe["activated"] == pytest.approx(dense["activated"], rel=0.04)
    assert moue["activated"] == pytest.approx(dense["activated"], rel=0.04)
    assert moue["total"] == pytest.approx(moe["total"], rel=0.02) and moe["total"] > 1.7 * dense["total"]
    tokens = {e: c.trainer.max_steps * c.data.batch_size * c.data.seq_len for e, (c, _) in runs.items()}
    assert len(set(tokens.values())) == 1  # every family of a size reads the same tokens
    assert tokens["moue_lm"] >= 20 * max(moe["total"], moue["total"])
    # no repeats: ~190 BPE-512 tokens per person (measured: 19.0M training tokens from 95,000 people)
    cfg = runs["moe_lm"][0]
    assert tokens["moe_lm"] < 0.9 * 190 * cfg.data.num_people * (1 - cfg.data.val_fraction)
    assert cfg.model.optim.warmup_steps < cfg.trainer.max_steps // 10
    assert cfg.trainer.max_steps % cfg.trainer.val_check_interval == 0


@pytest.mark.parametrize("people", [100, 1600])
def test_knowledge_capacity_reads_every_fact_as_often_at_every_size(tmp_path, people):
    cfg = compose_train_cfg(["hparams_search=knowledge_capacity", f"data.num_people={people}"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert params["data.num_people"] == "100,200,400,800,1600" and params.experiment == "dense_lm,moe_lm,moue_lm"
    assert cfg.data.bio_renderings == 5 and cfg.data.bio_full_names and list(cfg.data.train_templates) == [0, 1, 2]
    assert cfg.callbacks.fact_recall.max_probes == 256
    counts = {}
    for exp in ("dense_lm", "moe_lm", "moue_lm"):
        c = compose_train_cfg(["hparams_search=knowledge_capacity", f"experiment={exp}", f"data.num_people={people}"],
                              tmp_path)
        counts[exp] = _counts(c)
        assert c.model.net.d_model == 80 and c.trainer.max_steps == 5 * people  # the `l` shape, steps per person
        assert c.trainer.max_steps // c.trainer.val_check_interval == 5
    assert counts["moe_lm"]["activated"] == pytest.approx(counts["dense_lm"]["activated"], rel=0.04)
    assert counts["moue_lm"]["total"] == pytest.approx(counts["moe_lm"]["total"], rel=0.02)
    # ~100 readings of each fact: 5 biographies per person of ~217 BPE-512 tokens (measured at 100 people:
    # 25 windows of 32 x 129 tokens per epoch from 95 trained people), 95% of the people trained on
    tokens = cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len
    readings = tokens / (0.95 * people * cfg.data.bio_renderings * 217) * cfg.data.bio_renderings
    assert 90 < readings < 110
