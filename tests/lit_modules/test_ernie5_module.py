"""ERNIE 5.0 end to end on tiny random tokenizers: the multimodal DataModule's rows (packing, targets,
determinism, errors), the module's losses and knobs, routing counts per task, exact resume, generation
from a checkpoint, FSDP2 on 2 CPU processes."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

import train
from datamodules.multimodal import MultimodalDataModule, collate_rows
from models.ernie5 import IGNORE, KINDS, TASKS
from tests.conftest import compose_train_cfg
from tests.helpers import find_metrics, read_metric, run_train_cli

QUIET = ["~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "extras.print_config=false", "logger=csv"]
SMALL_DATA = dict(seq_len=192, batch_size=4, image_size=16, num_frames=5, clip_seconds=0.5, num_videos=12,
                  num_images=12, num_audio=12, val_videos=4, val_images=4, val_audio=4, num_people=40,
                  vocab_size=400, train_rows=16, val_rows=4, text_len=48)


@pytest.fixture(scope="module")
def audio_tokenizer(tiny_audio_tokenizer) -> Path:
    return tiny_audio_tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mm_cache")


@pytest.fixture(scope="module")
def dm(tiny_tokenizer, audio_tokenizer, cache):
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache), **SMALL_DATA)
    d.setup()
    return d


def test_rows_are_deterministic_packed_and_targets_stay_inside_documents(dm):
    ds = dm.datasets["train"]
    for i in range(6):
        a, b = ds[i], ds[i]
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["positions"], b["positions"])
        ids, kind, doc = a["ids"], a["kind"], a["doc_ids"]
        S = len(ids)
        for j, t in enumerate(a["text_targets"].tolist()):
            if t != IGNORE:
                assert t == int(ids[j + 1]) and doc[j] == doc[j + 1] and kind[j] == kind[j + 1] == KINDS["text"]
        for j, t in enumerate(a["mtp_targets"].tolist()):
            if t != IGNORE:
                assert t == int(ids[j + 2]) and doc[j] == doc[j + 2]
        # block ids never decrease along a row; a document's positions restart at 0
        assert (a["block_ids"][1:] >= a["block_ids"][:-1]).all()
        for d in doc.unique().tolist():
            sel = doc == d
            if (kind[sel] >= 0).any():
                assert float(a["positions"][sel][0, 0]) == 0.0
        # every media span covers tokens of its kind, in one document
        for mkind, task, start, count, tensor in a["spans"]:
            assert (kind[start:start + count] == KINDS[mkind]).all() and doc[start:start + count].unique().numel() == 1
            assert a["task"][start] == TASKS.index(task)
        assert S == dm.seq_len
    assert not torch.equal(ds[0]["ids"], ds[1]["ids"])


def test_batch_collation_groups_spans_with_flat_destinations(dm):
    ds = dm.datasets["train"]
    rows = [ds[i] for i in range(4)]
    batch = collate_rows(rows)
    S = dm.seq_len
    flat_kind = batch.kind.reshape(-1)
    for spans in batch.vis_gen + batch.vis_und:
        k = KINDS["vis_gen"] if spans in batch.vis_gen else KINDS["vis_und"]
        assert (flat_kind[spans.dest.reshape(-1)] == k).all()
        assert spans.latents.dim() == 5 and spans.latents.shape[0] == spans.dest.shape[0]
    for spans in batch.audio:
        assert (flat_kind[spans.dest.reshape(-1)] == KINDS["audio"]).all()
        assert spans.codes.shape[:2] == spans.dest.shape
        assert (batch.ids.reshape(-1)[spans.dest[:, 0] - 1] == dm.vocab["<boa>"]).all()
    assert batch.ids.shape == (4, S)


def test_understanding_spans_carry_the_pixels_their_latents_encode(dm, tiny_tokenizer):
    from models.tokenizers.checkpoint import load_media_tokenizer

    vtok, _ = load_media_tokenizer(str(tiny_tokenizer), "visual")
    ds = dm.datasets["train"]
    batch = collate_rows([ds[i] for i in range(8)])
    assert batch.vis_und
    for spans in batch.vis_und:
        n, T = spans.latents.shape[:2]
        assert spans.pixels.dtype == torch.uint8 and spans.pixels.shape[0] == n
        assert spans.pixels.shape[1] == 1 + vtok.cfg.time_stride * (T - 1)
        x = spans.pixels.float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)
        x = x[:, :, 0] if x.shape[2] == 1 else x
        with torch.no_grad():
            again = vtok.encode_features(x).transpose(1, 2)
        assert torch.allclose(again, spans.latents, atol=1e-5)  # the very frames the latents were encoded from


def test_vocabulary_boundary_tokens_and_caption_dropout(dm, tiny_tokenizer, audio_tokenizer, cache):
    v = dm.vocab
    assert len(v) == v.base + 7 and v["<sep>"] == v.base + 6
    assert v.decode(v.encode("a red circle") + [v["<boi>"]] + v.encode(" x")) == "a red circle<boi> x"
    # caption dropout: some generation documents start with their open token
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache),
                             **{**SMALL_DATA, "task_weights": {"image_gen": 1.0}, "caption_dropout": 0.5})
    d.setup()
    first = [int(d.datasets["train"][i]["ids"][0]) for i in range(12)]
    assert first.count(v["<boi>"]) not in (0, 12)


def test_bpe_dropout_resegments_training_captions_only_and_char_bpe_falls_back(dm, tiny_tokenizer, audio_tokenizer,
                                                                                cache):
    from datamodules.multimodal import RowDataset
    from models.tokenizers.text import CharBPETokenizer

    kw = {**SMALL_DATA, "task_weights": {"image_gen": 1.0}, "caption_dropout": 0.0}
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache), bpe_dropout=0.4, **kw)
    d.setup()
    v, ds = d.vocab, d.datasets["train"]
    assert isinstance(ds, RowDataset) and ds.bpe_dropout == 0.4 and d.datasets["val"].bpe_dropout == 0.0
    changed = 0
    for i in range(12):
        row = ds[i]
        assert torch.equal(row["ids"], ds[i]["ids"])  # a pure function of (seed, row)
        ids = row["ids"].tolist()
        caption = ids[:ids.index(v["<boi>"])]
        text = v.decode(caption)
        assert any(text in caps for caps in d.corpus.splits["train"]["image_captions"])  # same text, other pieces
        changed += caption != v.encode(text)
    assert changed > 0
    # validation rows never drop merges: they equal the rows of a run without dropout
    d0 = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache), **kw)
    d0.setup()
    assert all(torch.equal(d.datasets["val"][i]["ids"], d0.datasets["val"][i]["ids"]) for i in range(4))
    # biographies are re-segmented too (text rows decode to the same characters)
    t = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache), bpe_dropout=0.4,
                             **{**SMALL_DATA, "task_weights": {"text": 1.0}})
    t.setup()
    doc, _ = t.datasets["train"].document("text", torch.Generator().manual_seed(3))
    pieces = doc["ids"].tolist()
    assert any(t.vocab.decode(pieces[:-1]) in bio for bio in map(t.vocab.bpe.decode, t.corpus.splits["train"]["text"]))

    # ERNIE 5.0's character BPE: its own cache, out-of-alphabet characters as UTF-16BE byte tokens
    c = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache), text_tokenizer="char_bpe",
                             alphabet_size=16, **kw)
    c.setup()
    assert isinstance(c.vocab.bpe, CharBPETokenizer) and len(c.vocab.bpe.alphabet) == 16
    assert c.corpus.info["path"] != dm.corpus.info["path"]
    row = c.datasets["train"][0]["ids"].tolist()
    caption = c.vocab.decode(row[:row.index(c.vocab["<boi>"])])
    assert any(caption in caps for caps in c.corpus.splits["train"]["image_captions"])
    byte0 = c.vocab.bpe.hf_tokenizer.token_to_id("<0x00>")
    assert any(byte0 <= i < byte0 + 256 for i in row)  # a 16-character alphabet cannot spell every caption


@pytest.mark.parametrize("kw,match", [
    ({"bpe_dropout": 1.0}, "data.bpe_dropout"),
    ({"text_tokenizer": "wordpiece"}, "data.text_tokenizer"),
    ({"alphabet_size": 50}, "data.alphabet_size"),
    ({"task_weights": {"imag_gen": 1.0}}, "data.task_weights has unknown tasks"),
    ({"task_weights": {"text": 0.0}}, "data.task_weights"),
    ({"caption_dropout": 1.0}, "data.caption_dropout"),
    ({"source": "folder"}, "data.source"),
])
def test_bad_data_config_names_the_key(kw, match, tiny_tokenizer, audio_tokenizer, cache):
    with pytest.raises(ValueError, match=match):
        MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache), **{**SMALL_DATA, **kw})


def test_too_short_rows_and_wrong_tokenizer_kind_are_named(tiny_tokenizer, audio_tokenizer, cache):
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache),
                             **{**SMALL_DATA, "seq_len": 40})
    with pytest.raises(ValueError, match="data.seq_len=40"):
        d.setup()
    d = MultimodalDataModule(str(audio_tokenizer), str(audio_tokenizer), cache_dir=str(cache), **SMALL_DATA)
    with pytest.raises(ValueError, match="audio tokenizer, expected visual"):
        d.setup()


def test_corpus_cache_is_reused_and_a_corrupt_cache_is_rebuilt(dm, tiny_tokenizer, audio_tokenizer, cache, caplog):
    import logging

    path = Path(dm.corpus.info["path"])
    assert path.is_file()
    with caplog.at_level(logging.INFO):
        d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), cache_dir=str(cache), **SMALL_DATA)
        d.setup()
    assert "reusing the token cache" in caplog.text and d.corpus.info["built"] is False
    assert torch.equal(d.corpus.splits["val"]["video"], dm.corpus.splits["val"]["video"])


# ------------------------------------------------------------------------------------- the module


def cfg_for(tmp_path: Path, vt: Path, at: Path, cache: Path, *extra: str, subdir: str = "run"):
    data = [f"data.{k}={v}" for k, v in SMALL_DATA.items()]
    return compose_train_cfg(["experiment=ernie5_tiny", f"data.visual_tokenizer={vt}", f"data.audio_tokenizer={at}",
                              f"data.cache_dir={cache}", *data, "model.sample.num=0", *QUIET, *extra], tmp_path / subdir)


def test_training_logs_every_modality_loss_and_schedule_knobs(tmp_path, tiny_tokenizer, audio_tokenizer, cache):
    cfg = cfg_for(tmp_path, tiny_tokenizer, audio_tokenizer, cache, "trainer.max_steps=4", "trainer.val_check_interval=4",
                  "trainer.limit_val_batches=1", "test=false", "callbacks.ernie5_schedule.switch_at=0.5",
                  "+callbacks/cfec=default", "+callbacks/frame_mask=default", "callbacks.frame_mask.p_mask=0.5",
                  "callbacks.frame_mask.window=1")
    _, objs = train.run(cfg)
    m = find_metrics(Path(cfg.paths.output_dir))
    for key in ("train/loss_text", "train/loss_mtp", "train/loss_image", "train/loss_video", "train/loss_audio",
                "val/loss_text", "val/loss_image", "val/loss_video", "val/loss_audio", "val/loss"):
        assert read_metric(m, key), key
    # MTP weight 0.3 for steps 0-1, 0.1 from step 2 (half of 4)
    w = read_metric(m, "train/mtp_weight")
    assert w[0] == pytest.approx(0.3) and w[3] == pytest.approx(0.1)
    assert read_metric(m, "cfec/p_max")  # VideoAR's cross-frame error correction schedule drives this module too
    module = objs["model"]
    assert module.cfec.enabled
    # ... and its Random Frame Mask callback: the knobs reach training steps (video loss changes with them,
    # the other modalities do not), and the checkpoint keeps them
    assert set(read_metric(m, "frame_mask/p_mask").values()) == {0.5} and module.frame_mask_window == 1
    batch = next(b for b in objs["datamodule"].train_dataloader() if any(s.latents.shape[1] > 1 for s in b.vis_gen))
    with torch.no_grad():
        masked = module._losses(batch, corrupt=True)["terms"]
        module.frame_mask_prob, module.frame_mask_window = 0.0, None
        plain = module._losses(batch, corrupt=True)["terms"]
    assert masked["video"] != pytest.approx(float(plain["video"]), abs=1e-7)
    assert masked["audio"] == pytest.approx(float(plain["audio"]), abs=1e-5)
    knobs = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["knobs"]
    assert knobs["frame_mask_prob"] == 0.5 and knobs["frame_mask_window"] == 1
    assert module.bias_update_rate == pytest.approx(1e-5) and module.mtp_weight == pytest.approx(0.1)
    # routing analysis ran at validation: counts per task, every layer, and the knob is off again
    assert not module.track_routing and set(module.routing_counts) >= {"text", "image_gen", "audio_und"}
    L, E = module.net_cfg.n_layers, module.trunk.num_experts
    assert all(c.shape == (L, E) for c in module.routing_counts.values())
    assert list(Path(cfg.paths.output_dir).rglob("routing/step_4.md"))


def test_training_with_the_vit_branch_learns_it_and_captions_from_pixels(tmp_path, tiny_tokenizer, audio_tokenizer,
                                                                           cache):
    cfg = cfg_for(tmp_path, tiny_tokenizer, audio_tokenizer, cache, "model.net.vit_layers=1", "model.net.vit_dim=16",
                  "model.net.vit_heads=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
                  "trainer.limit_val_batches=1", "test=false",
                  *[f"data.task_weights.{t}=0" for t in ("text", "image_gen", "video_gen", "audio_und", "audio_gen")])
    torch.manual_seed(0)
    _, objs = train.run(cfg)
    module, dm_ = objs["model"], objs["datamodule"]
    assert module.net.vit is not None and module.net_cfg.pixel_patch == 4 and module.net_cfg.time_stride == 2
    assert read_metric(find_metrics(Path(cfg.paths.output_dir)), "val/loss_text")
    # the branch is trained: the captioning loss reaches every one of its parameters
    batch = next(iter(dm_.train_dataloader()))
    assert batch.vis_und and not batch.vis_gen and not batch.audio
    module.zero_grad()
    module._total(module._losses(batch, corrupt=True)["terms"], train=False).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.vit.parameters())
    from datamodules.multimodal import item_pixels

    va = dm_.corpus.splits["val"]
    module.eval()
    text = module.caption("image", va["image"][0], pixels=item_pixels(va, "image", 0), temperature=0.0,
                          max_new_tokens=4)
    assert isinstance(text, str)
    with pytest.raises(ValueError, match="vit_layers"):
        module.caption("image", va["image"][0], temperature=0.0, max_new_tokens=2)


ELASTIC_SEEN: list = []


class ElasticCheck(L.Callback):
    """Before backward: the training loss equals the loss of the sub-model the step applied, recomputed
    directly from the network (plus the distillation term against the full model)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        from models.layers.elastic import RoutingLimit

        applied = pl_module.last_elastic
        L, k = pl_module.net_cfg.n_layers, pl_module.net_cfg.moe.top_k
        layers = None if applied["layers"] == list(range(L)) else applied["layers"]
        top_k = None if applied["top_k"] == k else applied["top_k"]
        routing = None if applied["kept"] is None and top_k is None else RoutingLimit(applied["kept"], top_k)
        with torch.no_grad():
            res = pl_module._losses(self.batch, corrupt=True, layers=layers, routing=routing)
            want = pl_module._total(res["terms"], train=False) + res["balance"]
            if layers is not None or routing is not None:
                teacher = pl_module._losses(self.batch, corrupt=True)["out"]
                want = want + pl_module.elastic_distill * pl_module._distill(res["out"], teacher)
        ELASTIC_SEEN.append((float(loss.detach()), float(want), applied))


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, tiny_tokenizer, audio_tokenizer, cache):
    """experiment=ernie5_elastic's callback on a 4-layer tiny ERNIE 5.0, 4 steps: (cfg, module, last.ckpt)."""
    import importlib

    seen = importlib.import_module("tests.lit_modules.test_ernie5_module").ELASTIC_SEEN
    seen.clear()
    cfg = cfg_for(tmp_path_factory.mktemp("elastic"), tiny_tokenizer, audio_tokenizer, cache, "model.net.n_layers=4",
                  "+callbacks/elastic=default", "callbacks.elastic.depth_full_prob=0", "callbacks.elastic.width_full_prob=0",
                  "callbacks.elastic.sparsity_full_prob=0", "callbacks.elastic.distill_weight=0.5",
                  "+callbacks.check._target_=tests.lit_modules.test_ernie5_module.ElasticCheck",
                  "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "test=false")
    _, objs = train.run(cfg)
    return cfg, objs["model"], Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def test_elastic_training_runs_the_drawn_sub_model_and_the_grid_scores_sub_models(elastic_run, tmp_path):
    """Every step trains the sub-model it drew (depth >= the audio levels, half the experts, top-1),
    with distillation; validation runs the full model; tools/eval_ernie5.py --grid reproduces the
    validation loss at the full point and scores the sub-models."""
    import importlib

    from tools import eval_ernie5

    seen = importlib.import_module("tests.lit_modules.test_ernie5_module").ELASTIC_SEEN  # the list the callback filled
    cfg, module, ckpt = elastic_run
    ckpt = str(ckpt)
    assert module.elastic_min_depth == module.net.cfg.audio_levels == 2
    assert len(seen) == 4
    for got, want, applied in seen:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert 2 <= len(applied["layers"]) <= 3 and applied["layers"][0] == 0 and applied["layers"][-1] == 3
        assert all(len(kept) == 8 for kept in applied["kept"])  # 16 experts -> each layer's 8 most used
        assert applied["top_k"] == 1  # top-2 of 8 kept; a reduced draw is top-1
    m = find_metrics(Path(cfg.paths.output_dir))
    assert all(v > 0 for v in read_metric(m, "train/distill").values())
    assert set(read_metric(m, "elastic/depth").values()) <= {2.0, 3.0}
    assert all(knob is None for knob in (module.elastic_layers, module.elastic_experts, module.elastic_top_k))
    val_text = read_metric(m, "val/loss_text")[3]

    res = eval_ernie5.main([ckpt, "--grid", "--depths", "2", "4", "--experts", "8", "16", "--top-k", "1", "2",
                            "--out", str(tmp_path / "grid.json")])
    points = {(p["depth"], p["experts"], p["top_k"]): p for p in res["submodels"]}
    assert set(points) == {(d, e, t) for d in (2, 4) for e in (8, 16) for t in (1, 2)}
    full = points[(4, 16, 2)]
    assert full["loss_text"] == pytest.approx(val_text, rel=1e-5)  # the full point is the trainer's validation
    assert full["params_total"] == module.net.num_params()["total"]
    assert points[(2, 8, 1)]["params_activated"] < points[(4, 8, 1)]["params_activated"] < full["params_activated"]
    assert points[(4, 8, 2)]["params_total"] < full["params_total"]
    assert all(math.isfinite(p["loss"]) and set(p) >= {"loss_text", "loss_audio", "layers"} for p in points.values())
    assert points[(2, 16, 2)]["layers"] == [0, 3]
    with pytest.raises(ValueError, match="--depths must be in \\[2, 4\\]"):
        eval_ernie5.main([ckpt, "--grid", "--depths", "1"])


def test_exported_sub_model_equals_the_parent_under_that_choice_and_generates(elastic_run, dm, tmp_path, capsys):
    """tools/export_submodel.py on an ERNIE 5.0 checkpoint: the standalone sub-model's losses on every
    modality equal the parent's run under the same elastic choice; it generates text, images, video
    and audio on its own (KV cache equal to no cache, generate.py's CLI), and continues training."""
    import generate
    from lit_modules.ernie5 import Ernie5Module
    from models.layers.elastic import RoutingLimit, keep_experts
    from tools.export_submodel import export_submodel, main as export_main

    _, module, ckpt = elastic_run
    out = tmp_path / "sub" / "sub.ckpt"
    res = export_main([str(ckpt), str(out), "--depth", "2", "--experts", "8", "--top-k", "1"])
    assert "family: ernie5" in capsys.readouterr().out
    parent = Ernie5Module.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    sub = Ernie5Module.load_from_checkpoint(out, map_location="cpu", weights_only=True).eval()  # no parent needed
    kept = keep_experts(8, 16, 4, "usage", parent.expert_usage)
    assert res["layers"] == [0, 3] and res["kept"] == kept and res["family"] == "ernie5"
    assert sub.net.cfg.n_layers == 2 and sub.net.cfg.moe.num_experts == 8 and sub.net.cfg.moe.top_k == 1
    assert sub.net.audio_layers == [0, 1]  # the audio levels read the sub-model's own last Q layers
    routing = RoutingLimit(kept, 1)
    batches = [b for _, b in zip(range(2), dm.val_dataloader())]
    with torch.no_grad():
        for batch in batches:
            want = parent._losses(batch, corrupt=False, layers=[0, 3], routing=routing)["terms"]
            got = sub._losses(batch, corrupt=False)["terms"]
            assert set(got) == set(want) >= {"text", "mtp", "image", "video", "audio"}
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    assert sub.net.num_params()["total"] == res["params"]["total"] < parent.net.num_params()["total"]
    assert res["params"]["total"] == (parent.net.num_params()["total"] - parent.trunk.num_params()["total"]
                                      + parent.trunk.num_params([0, 3], routing)["total"])
    assert torch.equal(sub.loss_ema, parent.loss_ema) and sub.vocab.encode("a red circle") == parent.vocab.encode("a red circle")

    # KV-cached generation of the sub-model equals the uncached one, for text and audio
    v, g = sub.vocab, lambda: torch.Generator().manual_seed(3)  # noqa: E731
    prompt = [("text", v.encode("a red circle") + [v["<boa>"]])]
    cached = sub.net.generate_audio(prompt, 4, generator=g(), use_cache=True)
    assert torch.equal(cached, sub.net.generate_audio(prompt, 4, generator=g(), use_cache=False))
    text = [("text", v.encode("a red"))]
    assert sub.net.generate_text(text, 5, generator=g()) == sub.net.generate_text(text, 5, generator=g(), use_cache=False)
    (png,) = generate.main([str(out), "--task", "image", "--prompt", "a red circle", "--device", "cpu",
                            "--out", str(tmp_path / "samples")])
    assert png.suffix == ".png"

    # the experiment written beside it continues training the sub-model
    exp = (out.parent / "experiment" / "sub.yaml").read_text()
    assert "override /model: ernie5" in exp and "init_ckpt" in exp
    from tests.conftest import compose_train_cfg

    cont = compose_train_cfg([f"hydra.searchpath=[file://{out.parent}]", "experiment=sub", *QUIET,
                              "model.sample.num=0", "trainer.max_steps=1", "trainer.limit_val_batches=0", "test=false"],
                             tmp_path / "cont")
    _, objs = train.run(cont)
    assert objs["model"].net.cfg.n_layers == 2
    torch.testing.assert_close(objs["model"].net.lm_head.weight, sub.net.lm_head.weight, rtol=1e-2, atol=1e-2)

    with pytest.raises(ValueError, match=r"--depth must be in \[2, 4\] .*audio code levels read the last 2 layers"):
        export_submodel(ckpt, tmp_path / "x" / "bad.ckpt", depth=1)
    with pytest.raises(ValueError, match="--layers must keep at least 2 layers"):
        export_submodel(ckpt, tmp_path / "x" / "bad.ckpt", layers=[3])
    assert not (tmp_path / "x").exists()


def test_rl_captioning_rewards_the_verifier_and_writes_an_ernie5_checkpoint(elastic_run, tiny_tokenizer,
                                                                           audio_tokenizer, cache, tmp_path):
    """experiment=ernie5_rl_caption from an ERNIE 5.0 checkpoint, 2 steps: rollouts are deterministic and
    scored by the caption verifier; the teacher-forced log-probs of the sampled captions equal the
    KV-cached sampler's (ratio 1); the KL to the initial policy starts at 0; the checkpoint loads as a
    plain ERNIE 5.0 checkpoint."""
    from datamodules.captions import caption_reward
    from lit_modules.ernie5 import Ernie5Module

    _, _, ckpt = elastic_run
    data = [f"data.{k}={v}" for k, v in SMALL_DATA.items() if k not in ("batch_size",)]
    cfg = compose_train_cfg(["experiment=ernie5_rl_caption", f"model.init_ckpt={ckpt}", f"data.visual_tokenizer={tiny_tokenizer}",
                             f"data.audio_tokenizer={audio_tokenizer}", f"data.cache_dir={cache}", *data, *QUIET,
                             "data.batch_size=3", "data.val_prompts=2", "model.rl.group_size=2", "model.rl.max_new_tokens=6",
                             "model.rl.kl_coef=0.1", "model.optim.lr=1e-3", "trainer.max_steps=2",
                             "trainer.val_check_interval=2", "test=false"], tmp_path / "rl")
    _, objs = train.run(cfg)
    module, dm = objs["model"], objs["datamodule"]
    m = find_metrics(Path(cfg.paths.output_dir))
    for key in ("train/reward", "train/loss", "train/kl", "train/response_len", "val/reward", "val/loss"):
        assert read_metric(m, key), key
    assert read_metric(m, "train/kl")[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert module.net.cfg.n_layers == 4  # the init checkpoint's architecture

    # the rollout: deterministic under a generator, every reward the verifier's, log-probs = teacher forcing
    prompts = [{"medium": "image", "index": 0}, {"medium": "audio", "index": 1}]
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ro = module.rollout(prompts, g())
    again = module.rollout(prompts, g())
    assert ro["responses"] == again["responses"] and len(ro["responses"]) == 4
    train_split = dm.corpus.splits["train"]
    for i, (med, ids) in enumerate(zip(ro["media"], ro["responses"])):
        j = prompts[i // 2]["index"]
        assert med == prompts[i // 2]["medium"]
        assert float(ro["rewards"][i]) == caption_reward(med, module.vocab.decode(ids), train_split[f"{med}_captions"][j][0])
    with torch.no_grad():
        logp, mask, _, _ = module.response_logprobs(module.net.eval(), ro["media"], ro["items"], ro["responses"])
    for i, lp in enumerate(ro["logp"]):
        torch.testing.assert_close(logp[i, :len(lp)], lp, rtol=1e-4, atol=1e-4)
        assert int(mask[i].sum()) == len(lp)

    # an ordinary ERNIE 5.0 checkpoint (RL knobs beside the hyper-parameters)
    raw = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert raw["rl"]["group_size"] == 2 and "rl" not in raw["hyper_parameters"]
    plain = Ernie5Module.load_from_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
                                              map_location="cpu", weights_only=True)
    torch.testing.assert_close(plain.net.lm_head.weight, module.net.lm_head.weight)
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="model.rl.group_size must be >= 2"):
        train.run(compose_train_cfg(["experiment=ernie5_rl_caption", f"model.init_ckpt={ckpt}", "model.rl.group_size=1",
                                     f"data.visual_tokenizer={tiny_tokenizer}", f"data.audio_tokenizer={audio_tokenizer}",
                                     f"data.cache_dir={cache}", *data, *QUIET], tmp_path / "bad"))


def test_elastic_depth_never_goes_below_the_family_minimum():
    from tests.lit_modules.test_elastic_training import fake_module
    from callbacks.elastic import ElasticSampler

    module = fake_module(n_layers=6)
    module.elastic_min_depth = 4
    sampler = ElasticSampler(depth_full_prob=0.0)
    depths = {len(sampler.choice_at(module, step, 0)["layers"] or range(6)) for step in range(40)}
    assert depths == {4, 5}  # the default range [ceil(6/2), 5] raised to the family's floor
    with pytest.raises(ValueError, match="callbacks.elastic.min_depth .* at least 4 layers"):
        ElasticSampler(min_depth=3).choice_at(module, 0, 0)


def test_posterior_weighting_divides_each_modality_by_its_ema(tmp_path, tiny_tokenizer, audio_tokenizer, cache, dm):
    import hydra

    cfg = cfg_for(tmp_path, tiny_tokenizer, audio_tokenizer, cache, "model.posterior_weighting=true")
    module = hydra.utils.instantiate(cfg.model)
    module._datamodule = lambda: dm
    module.configure_model()
    terms = {"text": torch.tensor(6.0), "image": torch.tensor(0.5), "audio": torch.tensor(4.0), "mtp": torch.tensor(6.5)}
    first = module._total(terms, train=True)  # EMA starts at the first value: each term is 1
    assert first == pytest.approx(3 + 0.3 * 6.5)
    second = module._total({**terms, "text": torch.tensor(3.0)}, train=True)
    ema_text = 0.99 * 6.0 + 0.01 * 3.0
    assert second == pytest.approx(3.0 / ema_text + 2 + 0.3 * 6.5, rel=1e-5)


def test_exact_resume_and_generation_from_the_checkpoint(tmp_path, tiny_tokenizer, audio_tokenizer, cache):
    extra = ["trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test=false",
             "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=-1",
             "model.cfec.enabled=true", "model.optim.total_steps=4"]  # the schedules' horizon survives the stop
    full = cfg_for(tmp_path, tiny_tokenizer, audio_tokenizer, cache, *extra, "trainer.max_steps=4", subdir="full")
    train.run(full)
    loss_full = read_metric(find_metrics(Path(full.paths.output_dir)), "train/loss")
    part = cfg_for(tmp_path, tiny_tokenizer, audio_tokenizer, cache, *extra, "trainer.max_steps=2", subdir="part")
    train.run(part)
    ckpt = sorted((Path(part.paths.output_dir) / "checkpoints").glob("step*.ckpt"))[-1]
    resumed = cfg_for(tmp_path, tiny_tokenizer, audio_tokenizer, cache, *extra, "trainer.max_steps=4",
                      f"ckpt_path={ckpt}", subdir="resumed")
    train.run(resumed)
    loss_res = read_metric(find_metrics(Path(resumed.paths.output_dir)), "train/loss")
    assert set(loss_res) == {2, 3}
    for step, value in loss_res.items():
        assert value == pytest.approx(loss_full[step], abs=1e-6)

    # the checkpoint alone rebuilds the model, its vocabulary and its tokenizers: any-to-any generation
    from lit_modules.ernie5 import Ernie5Module

    last = Path(full.paths.output_dir) / "checkpoints" / "last.ckpt"
    m = Ernie5Module.load_from_checkpoint(last, map_location="cpu", weights_only=True).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    lat = torch.randn(1, 8, 4, 4)
    text = m.caption("image", lat, g(), max_new_tokens=6)
    assert isinstance(text, str) and text == m.caption("image", lat, g(), max_new_tokens=6)
    tokens, video = m.render("a red circle", "video", 2, g())
    assert video.shape == (1, 3, 3, 16, 16) and video.abs().max() <= 1
    tokens, image = m.render("a red circle", "image", 1, g())
    assert image.shape == (1, 3, 1, 16, 16)
    codes, wave = m.speak("a steady tone", 5, g())
    assert codes.shape == (1, 5, 2) and wave.dim() == 2


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes(tmp_path, tiny_tokenizer, audio_tokenizer, cache, dm):
    out = tmp_path / "fsdp"
    data = [f"data.{k}={v}" for k, v in SMALL_DATA.items()]
    run_train_cli(["experiment=ernie5_tiny", f"data.visual_tokenizer={tiny_tokenizer}",
                   f"data.audio_tokenizer={audio_tokenizer}", f"data.cache_dir={cache}", *data, "model.sample.num=0",
                   "trainer=fsdp", "trainer.devices=2", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                   "trainer.val_check_interval=2", "test=false", *QUIET, f"hydra.run.dir={out}"])
    loss = read_metric(find_metrics(out), "train/loss")
    assert len(loss) == 2 and all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    assert list(out.rglob("routing/step_2.md"))


def test_generate_cli_eval_and_routing_report_from_a_checkpoint(tmp_path, tiny_tokenizer, audio_tokenizer, cache):
    import generate
    from datamodules.media_io import read_audio
    from tools import eval_ernie5, routing_report

    # with the patch merger's ViT branch: captioning files and held-out items needs their pixels
    cfg = cfg_for(tmp_path, tiny_tokenizer, audio_tokenizer, cache, "trainer.max_steps=2", "trainer.limit_val_batches=0",
                  "test=false", "model.net.vit_layers=1", "model.net.vit_dim=16", "model.net.vit_heads=2")
    train.run(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert generate.is_ernie5(ckpt) and not generate.is_videoar(ckpt)
    out = tmp_path / "samples"
    common = ["--device", "cpu", "--out", str(out), "--max-new-tokens", "4"]
    (png,) = generate.main([ckpt, "--task", "image", "--prompt", "a red circle", *common])
    (gif,) = generate.main([ckpt, "--task", "video", "--prompt", "a red circle", "--frames", "2", *common])
    (wav,) = generate.main([ckpt, "--task", "audio", "--prompt", "a tone", "--seconds", "0.5", *common])
    assert png.suffix == ".png" and gif.suffix == ".gif" and read_audio(wav).numel() > 0
    # the cascade: the same prompt through a (tiny, untrained) diffusion refiner comes out 2x larger
    from torchvision.io import decode_png, read_file

    from models.refiner import Refiner, RefinerConfig

    ref = Refiner(RefinerConfig(preset="tiny"))
    ref_ckpt = tmp_path / "refiner.ckpt"
    torch.save({"refiner": {"config": ref.cfg.to_dict()},
                "state_dict": {f"net.{k}": v for k, v in ref.state_dict().items()}}, ref_ckpt)
    (big,) = generate.main([ckpt, "--task", "image", "--prompt", "a red circle", "--refiner", str(ref_ckpt),
                            "--refine-steps", "2", *common, "--out", str(tmp_path / "refined")])
    small_hw, big_hw = decode_png(read_file(str(png))).shape[-2:], decode_png(read_file(str(big))).shape[-2:]
    assert tuple(big_hw) == (2 * small_hw[0], 2 * small_hw[1])
    with pytest.raises(ValueError, match="--refiner refines images and videos"):
        generate.main([ckpt, "--task", "text", "--refiner", str(ref_ckpt), *common])
    from tools import eval_refiner

    ev = eval_refiner.main([str(ref_ckpt), "--ernie5", ckpt, "--num", "2", "--prompts", "2", "--steps", "2",
                            "--tokenizer", str(tiny_tokenizer), "--device", "cpu"])
    assert ev["generated"]["prompts"] == 2 and ev["generated"]["consistency_psnr"] > 0
    assert set(ev["held_out"]) == {"area", "tokenizer"} and ev["size"] == 32  # the tiny tokenizer's 16 px, x2
    video = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    per_frame = generate.refine_frames(ref, video, 2, torch.Generator().manual_seed(0))
    assert per_frame.shape == (2, 3, 3, 16, 16)
    captions = generate.main([ckpt, "--task", "caption", "--input", str(png), "--input", str(wav), "--input", str(gif),
                              *common])
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    with pytest.raises(ValueError, match="--task caption needs --input"):
        generate.main([ckpt, "--task", "caption", *common])

    res = eval_ernie5.main([ckpt, "--num", "2", "--text-rows", "4", "--text-baseline", ckpt, "--out", str(tmp_path / "e.json")])
    assert res["checkpoint_step"] == 2 and res["text_loss"] == pytest.approx(res["text_loss_baseline"])
    assert set(res["understanding"]) == {"image", "video", "audio"}
    for medium in ("image", "video", "audio"):
        g = res["generation"][medium]
        assert set(g["generated"]) == set(g["probe_on_real"]) and all(0 <= v <= 1 for v in g["generated"].values())
    assert (tmp_path / "e.json").is_file()
    assert res["text_bits_per_byte"] > 0
    txt = eval_ernie5.main([ckpt, "--text-only", "--max-docs", "3"])
    assert txt["text_tokenizer"] == "bpe" and txt["documents"] == 3 and txt["bytes"] > txt["tokens"] > 0
    # bits per byte = nats per token * tokens / bytes / ln 2, over the bytes the held-out targets spell:
    # every byte of the documents (and their EOS) but the windows' unscored first tokens
    assert txt["bits_per_byte"] == pytest.approx(txt["nats_per_token"] * txt["tokens"] / txt["bytes"] / math.log(2))
    module_, dm_ = eval_ernie5.load(ckpt, "cpu")
    docs = dm_.corpus.splits["val"]["text"][:3]
    assert txt["bytes"] + txt["unscored_bytes"] == sum(eval_ernie5.target_bytes(dm_.corpus.vocab, d) for d in docs)
    und = eval_ernie5.main([ckpt, "--num", "2", "--text-rows", "4", "--understanding-only"])
    assert und["understanding"] == res["understanding"] and "generation" not in und
    assert set(und["caption_loss"]) == {"image", "video", "audio"} and all(v > 0 for v in und["caption_loss"].values())
    for medium in ("image", "video"):
        rank = und["attribute_ranking"][medium]
        assert rank["colour_candidates"] == 12 and rank["shape_candidates"] == 3
        assert rank["colour_items"] >= 1 and 0.0 <= rank["colour"] <= 1.0
    # batched, padded caption scoring equals scoring each caption on its own row
    from datamodules.multimodal import item_pixels

    module, dm_ = eval_ernie5.load(ckpt, "cpu")
    va = dm_.corpus.splits["val"]
    caps = [va["image_captions"][0][0], "a large red circle", va["image_captions"][1][0]]
    items, pix = [va["image"][0]] * 3, [item_pixels(va, "image", 0)] * 3
    batched = eval_ernie5.caption_logprobs(module, "image", items, pix, caps)
    single = [eval_ernie5.caption_logprobs(module, "image", items[:1], pix[:1], [c])[0] for c in caps]
    assert batched == pytest.approx(single, rel=1e-5, abs=1e-4) and all(x < 0 for x in batched)

    md = routing_report.main([ckpt, "--rows", "4", "--out", str(tmp_path / "rr")])
    assert "step 2" in md and "IoU" in md
    counts = torch.load(tmp_path / "rr" / "counts.pt", weights_only=True)
    assert "text" in counts and all(c.shape == counts["text"].shape for c in counts.values())
    assert (tmp_path / "rr" / "iou_layer_1.png").is_file() and (tmp_path / "rr" / "entropy.png").is_file()


def test_jsonl_manifest_of_real_files_errors_name_file_and_line_or_skip_counts(tmp_path, tiny_tokenizer, audio_tokenizer):
    import json

    from datamodules.media_io import write_audio, write_video
    from models.io import atomic_write_bytes

    from torchvision.io import encode_png

    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(4):
        img = (torch.rand(3, 20, 20, generator=g) * 255).byte()
        atomic_write_bytes(tmp_path / f"img{i}.png", encode_png(img).numpy().tobytes())
        lines.append({"image": f"img{i}.png", "text": f"an image number {i}"})
        write_video(tmp_path / f"vid{i}.gif", (torch.rand(5, 16, 16, 3, generator=g) * 255).byte(), fps=4)
        lines.append({"video": str(tmp_path / f"vid{i}.gif"), "text": f"a video number {i}"})
        write_audio(tmp_path / f"snd{i}.wav", torch.rand(8000, generator=g) * 0.2 - 0.1, 16000)
        lines.append({"audio": f"snd{i}.wav", "text": f"a sound number {i}"})
    (tmp_path / "bios.txt").write_text("Ada was born in Paris.\n\nBo studied in Rome.\n\nCy works in Oslo.\n")
    manifest = tmp_path / "m.jsonl"
    kw = dict(SMALL_DATA, cache_dir=str(tmp_path / "cache"), text_source=str(tmp_path / "bios.txt"), val_fraction=0.25)
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), source=str(manifest), **kw)
    d.setup()
    tr, va = d.corpus.splits["train"], d.corpus.splits["val"]
    assert (len(tr["image"]), len(va["image"]), len(tr["video"]), len(tr["audio"])) == (3, 1, 3, 3)
    assert tr["video"].shape[1] == 3 and tr["image"].shape[1] == 1  # 5 frames -> 3 latent frames; an image -> 1
    assert d.datasets["train"][0]["ids"].shape == (SMALL_DATA["seq_len"],)
    # a long video gives several clips (windows every clip_stride frames), each with the line's caption
    write_video(tmp_path / "long.gif", (torch.rand(11, 16, 16, 3, generator=g) * 255).byte(), fps=4)
    long = {"video": "long.gif", "text": "a long video"}
    manifest.write_text(json.dumps(long) + "\n" + json.dumps(lines[1]) + "\n")
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), source=str(manifest), clips_per_video=0,
                             clip_stride=3, **{**kw, "val_fraction": 0.5, "task_weights": {"video_gen": 1.0}})
    d.setup()
    split = {s: d.corpus.splits[s]["video_captions"] for s in ("train", "val")}
    # starts 0, 3, 6 of 11 frames, 5 frames each: three clips, all in the long video's split
    assert sorted(map(len, split.values())) == [1, 3] and [["a long video"]] * 3 in split.values()
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # a missing file and a corrupt one: errors name the file and the manifest line, or skip and count
    (tmp_path / "bad.png").write_bytes(b"not a png")
    bad = lines + [{"image": "missing.png", "text": "gone"}, {"image": "bad.png", "text": "broken"}]
    manifest.write_text("\n".join(json.dumps(x) for x in bad) + "\n")
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), source=str(manifest), **kw)
    with pytest.raises(ValueError, match=r"m\.jsonl:13: image file .*missing\.png"):
        d.setup()
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), source=str(manifest), on_bad_file="skip", **kw)
    d.setup()
    assert d.num_bad_files == 2 and len(d.corpus.splits["train"]["image"]) == 3
    manifest.write_text(json.dumps({"image": "img0.png"}) + "\n")
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), source=str(manifest), **kw)
    with pytest.raises(ValueError, match=r"m\.jsonl:1: a manifest line needs exactly one of"):
        d.setup()
    # a task whose medium the data lacks is named
    manifest.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[3]) + "\n")
    d = MultimodalDataModule(str(tiny_tokenizer), str(audio_tokenizer), source=str(manifest), **kw)
    with pytest.raises(ValueError, match="data.task_weights.video_und=1.0 but the data has no video"):
        d.setup()
