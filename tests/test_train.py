"""train.py: config composition, the output contract, bad-config errors, sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

import train
from tests.conftest import CONF, TINY, compose_train_cfg
from tests.helpers import find_metrics, read_metric, run_train_cli

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_default_config_composes(tmp_path):
    cfg = compose_train_cfg([], tmp_path)
    assert cfg.model._target_ == "lit_modules.lm.LanguageModelModule"
    assert cfg.data.source == "bios" and cfg.trainer.accelerator == "cpu"
    assert "tensorboard" in cfg.logger and cfg.seed == 0
    assert cfg.hydra.job.chdir is False
    assert cfg.callbacks.model_checkpoint.dirpath == f"{tmp_path}/checkpoints"
    # the preset named in YAML decides the sizes (schema defaults must not pin another preset's)
    import hydra

    from models.transformer import PRESETS

    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert module.net_cfg.preset == "small" and module.net_cfg.d_model == PRESETS["small"]["d_model"]


# Data shrunk (per data group) so that a large experiment still does one CPU step quickly; the
# model is as configured.
SMALL_DATA = {
    "text": ["data.num_people=30", "data.batch_size=2", "data.seq_len=32", "data.vocab_size=512"],
    "video": ["data.num_clips=6", "data.batch_size=2"],
    "image": ["data.num_clips=4", "data.batch_size=2"],
    "audio": ["data.num_clips=6", "data.batch_size=2"],
    "tokens": [],
    "knowledge": ["data.num_people=40", "data.batch_size=2", "data.seq_len=48", "data.vocab_size=512",
                  "data.dlm_segments=2"],
    "knowledge_finetune": ["data.num_people=40", "data.batch_size=2", "data.vocab_size=512"],
    "tasks": ["data.n_train=64", "data.n_eval=4", "data.batch_size=2", "data.seq_len=48", "data.prompts_per_step=2"],
    "multimodal": ["data.num_videos=8", "data.num_images=8", "data.num_audio=8", "data.val_videos=2",
                   "data.val_images=2", "data.val_audio=2", "data.num_people=30", "data.vocab_size=512",
                   "data.batch_size=2", "data.train_rows=4", "data.val_rows=2", "model.sample.num=1"],
}
TEXT_GROUPS = ("text", "knowledge", "knowledge_finetune")  # share the session's tokenizer cache


def experiment_data_group(name: str) -> str:
    """The data group an experiment selects (following experiments it includes in its defaults)."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    for line in text.splitlines():
        if "override /data:" in line:
            return line.split(":")[-1].strip()
        included = line.strip().removeprefix("- ").strip()
        if line.strip().startswith("- ") and (CONF / "experiment" / f"{included}.yaml").is_file():
            return experiment_data_group(included)
    return "text"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """One empty artifact cache for the session: the first experiment that needs a frozen tokenizer
    (or stage, or token cache) builds it in debug mode, later ones reuse it."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run(experiment, tmp_path, data_cache, artifacts):
    """Every experiment as configured, from a fresh clone: no manual step (what it needs is built)."""
    group = experiment_data_group(experiment)
    cache = data_cache if group in TEXT_GROUPS else tmp_path / "cache" if group == "multimodal" else None
    cfg = compose_train_cfg(
        [f"experiment={experiment}", "debug=fdr", *SMALL_DATA[group],
         f"paths.artifacts_dir={artifacts}", "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"],
        tmp_path, cache,
    )
    metrics, objects = train.run(cfg)
    loss = metrics.get("train/loss", metrics.get("train/loss_total"))
    assert loss is not None and torch.isfinite(torch.tensor(loss))
    assert "test/loss" in metrics


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit", "profiler"])
def test_config_groups_compose(trainer, debug, tmp_path):
    cfg = compose_train_cfg([f"trainer={trainer}", f"debug={debug}", "logger=csv", "hparams_search=lm_optuna"], tmp_path)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.net.n_layr=4", "model.net.n_layr"),
        ("model.net.n_layers=abc", "model.net.n_layers"),
        ("data.batch_sise=4", "data.batch_sise"),
        ("data.seq_len=long", "data.seq_len"),
        ("model.optim.lr=fast", "model.optim.lr"),
    ],
)
def test_bad_config_keys_and_types_fail_at_compose_naming_the_key(override, key, tmp_path):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        compose_train_cfg([override], tmp_path)
    text = str(err.value) + str(err.value.__cause__)
    assert key in text


@pytest.mark.parametrize(
    "override, key",
    [("model.nonfinite=sometimes", "model.nonfinite"), ("model.net.n_heads=3", "model.net"), ("model.optim.lr=-1", "model.optim.lr")],
)
def test_bad_config_values_fail_before_training_naming_the_key(override, key, make_cfg):
    cfg = make_cfg([override])
    with pytest.raises(Exception) as err:
        train.run(cfg)
    assert key in str(err.value) + str(err.value.__cause__)


def test_run_writes_logs_checkpoints_config_and_returns_metric(make_cfg, tmp_path):
    cfg = make_cfg(["logger=many", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2"])
    metrics, objects = train.run(cfg)
    run_dir = tmp_path / "run"
    losses = read_metric(find_metrics(run_dir))
    assert sorted(losses) == list(range(6))  # train/loss at every step
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert train.metric_value(metrics, "val/loss") == pytest.approx(metrics["val/loss"])
    params = read_metric(find_metrics(run_dir), "params/total")
    assert params and list(params.values())[0] == objects["model"].model.num_params()["total"]
    with pytest.raises(KeyError, match="val/nope"):
        train.metric_value(metrics, "val/nope")


def test_config_tree_printed_and_saved(make_cfg, tmp_path, capsys):
    cfg = make_cfg(["extras.print_config=true", "debug=fdr"])
    train.run(cfg)
    run_dir = tmp_path / "run"
    assert "model" in (run_dir / "config_tree.log").read_text()
    assert "${" not in (run_dir / "resolved_config.yaml").read_text()


def test_seed_zero_is_applied(make_cfg, monkeypatch):
    seen = []
    monkeypatch.setattr(train.L, "seed_everything", lambda s, workers=False: seen.append(s))
    train.run(make_cfg(["seed=0", "debug=fdr"]))
    assert seen == [0]


@pytest.mark.slow
def test_cli_run_dir_contract_and_resume(tmp_path):
    """`python train.py ... hydra.run.dir=DIR`: everything under DIR, metrics.csv, last.ckpt, ckpt_path resumes."""
    cache = tmp_path / "cache"
    args = TINY + ["logger=csv", "trainer.max_steps=4", f"data.cache_dir={cache}"]
    run_train_cli(args + [f"hydra.run.dir={tmp_path / 'a'}"])
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_file() and (tmp_path / "a" / ".hydra" / "config.yaml").is_file()
    assert sorted(read_metric(find_metrics(tmp_path / "a"))) == [0, 1, 2, 3]
    run_train_cli(args + [f"hydra.run.dir={tmp_path / 'b'}", "trainer.max_steps=6", f"ckpt_path={last}"])
    assert sorted(read_metric(find_metrics(tmp_path / "b"))) == [4, 5]


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path):
    cache = tmp_path / "cache"
    run_train_cli(["-m"] + TINY + ["seed=0,1", "logger=csv", "trainer.max_steps=3", "test=false",
                          "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
                          f"data.cache_dir={cache}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    a, b = (read_metric(find_metrics(tmp_path / "sweep" / str(i))) for i in (0, 1))
    assert sorted(a) == sorted(b) == [0, 1, 2]
    assert a != b  # different seeds, different runs


@pytest.mark.slow
def test_multirun_refuses_in_job_ddp_relaunch(tmp_path):
    proc = run_train_cli(["-m"] + TINY + ["seed=0", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], check=False)
    assert proc.returncode != 0
    assert "multirun" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_optuna_search_runs_and_reports_the_metric(tmp_path):
    proc = run_train_cli(TINY + ["hparams_search=lm_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
                                 "logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
                                 f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in best and "model.optim.lr" in best and "best_value" in best
    assert len(list((tmp_path / "sweep").glob("*/csv/metrics.csv"))) == 2


def test_required_tokenizer_is_built_once_reused_and_an_explicit_path_wins(tmp_path, caplog):
    import logging

    art = tmp_path / "artifacts"

    def cfg(extra, sub):
        return compose_train_cfg(["experiment=videoar", "debug=fdr", "data.num_clips=6", "data.batch_size=2",
                                  f"paths.artifacts_dir={art}", "trainer.enable_progress_bar=false",
                                  "~callbacks.rich_progress_bar", *extra], tmp_path / sub)

    with caplog.at_level(logging.INFO, logger="artifacts"):
        _, objects = train.run(cfg([], "a"))
    built = list(art.glob("video_tokenizer-*/final.ckpt"))
    assert len(built) == 1 and "requires: building experiment=video_tokenizer" in caplog.text
    # the video tokenizer itself starts from the image tokenizer, built first (nested requires)
    assert len(list(art.glob("image_tokenizer-*/final.ckpt"))) == 1
    assert "requires: building experiment=image_tokenizer" in caplog.text
    assert objects["cfg"].model.tokenizer_ckpt == str(built[0])
    assert objects["model"].tokenizer_info["path"] == str(built[0])
    stamp = built[0].stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="artifacts"):
        train.run(cfg([], "b"))
    assert "requires: reusing" in caplog.text and built[0].stat().st_mtime_ns == stamp
    # the run's seed is not the tokenizer's: every seed of a sweep shares one frozen tokenizer
    _, objects = train.run(cfg(["seed=1"], "c"))
    assert list(art.glob("video_tokenizer-*/final.ckpt")) == built
    assert objects["cfg"].model.tokenizer_ckpt == str(built[0])
    # an explicit tokenizer wins: nothing is built
    elsewhere = tmp_path / "untouched"
    train.run(cfg([f"model.tokenizer_ckpt={built[0]}", f"paths.artifacts_dir={elsewhere}"], "d"))
    assert not elsewhere.exists()


def test_video_tokenizer_experiment_inflates_and_weighs_chroma_by_default(tmp_path):
    """The documented default (issue 10): image -> inflate -> video with model.loss.chroma=1; the image
    stage it inflates keeps the plain loss (its cached builds stay valid), and chroma=0 is one override away."""
    import hydra

    video = compose_train_cfg(["experiment=video_tokenizer"], tmp_path)
    assert video.model.inflate_from == "auto" and video.model.loss.chroma == 1.0
    scratch = compose_train_cfg(["experiment=video_tokenizer", "model.inflate_from=null"], tmp_path)
    assert hydra.utils.instantiate(scratch.model, _convert_="all").loss_cfg.chroma == 1.0  # reaches the module
    assert compose_train_cfg(["experiment=image_tokenizer"], tmp_path).model.loss.chroma == 0.0
    assert compose_train_cfg(["experiment=video_tokenizer", "model.loss.chroma=0"], tmp_path).model.loss.chroma == 0.0


def test_requires_when_auto_fills_only_auto_and_inherits_only_what_differs(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    import tools.artifacts as artifacts

    real_checkpoint = artifacts.experiment_checkpoint
    calls = []
    monkeypatch.setattr(artifacts, "experiment_checkpoint",
                        lambda cfg, exp, extra, inherit=None: calls.append((exp, extra, inherit)) or f"/built/{exp}")
    spec = {"experiment": "image_tokenizer", "when": "auto", "inherit": ["model.net.preset"]}
    for value, filled in ((None, False), ("some.ckpt", False), ("auto", True)):
        cfg = OmegaConf.create({"requires": {"model.inflate_from": spec},
                                "model": {"inflate_from": value, "net": {"preset": "tiny"}}})
        assert bool(artifacts.ensure_requirements(cfg)) == filled
        assert cfg.model.inflate_from == ("/built/image_tokenizer" if filled else value)
    assert calls == [("image_tokenizer", [], {"model.net.preset": "tiny"})]
    with pytest.raises(ValueError, match="requires.model.inflate_from.when"):
        artifacts.ensure_requirements(OmegaConf.create({"requires": {"model.inflate_from": {**spec, "when": "x"}},
                                                        "model": {"inflate_from": None}}))
    # only inherited values that differ from what the built experiment composes to become overrides
    built = []
    monkeypatch.setattr(artifacts, "_build_once", lambda target, build, what, fp: built.append(what) or target)
    # a parent run with no debug mode and a cpu trainer (its own choices, not a HydraConfig left by another test)
    parent = OmegaConf.create({"paths": {"artifacts_dir": str(tmp_path)}, "hydra": {"runtime": {"choices": {}}}})
    same = real_checkpoint(parent, "image_tokenizer", [], {"model.net.preset": "small", "data.image_size": 32})
    other = real_checkpoint(parent, "image_tokenizer", [], {"model.net.preset": "tiny", "data.image_size": 32})
    assert built == ["experiment=image_tokenizer", "experiment=image_tokenizer model.net.preset=tiny"]
    assert same != other and same == real_checkpoint(parent, "image_tokenizer", [])


def test_artifact_fingerprint_ignores_only_options_that_cannot_change_the_build():
    """A run composed before `model.optim.schedule` existed and one composed with it at `cosine` build
    the same thing: same fingerprint (the artifacts built before the option are reused); `wsd` differs."""
    from tools.artifacts import fingerprint

    def content(**optim):
        return {"model": {"net": {"preset": "small"}, "optim": {"lr": 2e-3, **optim}}, "seed": 0}

    before = fingerprint(content(), ["experiment=image_tokenizer"])
    assert fingerprint(content(schedule="cosine", decay_fraction=0.2), ["experiment=image_tokenizer"]) == before
    assert fingerprint(content(schedule="cosine", decay_fraction=0.5), ["experiment=image_tokenizer"]) == before
    wsd = fingerprint(content(schedule="wsd", decay_fraction=0.2), ["experiment=image_tokenizer"])
    assert wsd != before != fingerprint(content(lr=1e-3), ["experiment=image_tokenizer"])
    assert wsd != fingerprint(content(schedule="wsd", decay_fraction=0.5), ["experiment=image_tokenizer"])


@pytest.mark.parametrize("off, on", [
    ({"model": {"image_steps": 0, "image_batch_factor": 4, "clips_per_step": None}},
     {"model": {"image_steps": 600, "image_batch_factor": 4, "clips_per_step": None}}),
    ({"model": {"image_steps": 0, "image_batch_factor": 4, "clips_per_step": None}},
     {"model": {"image_steps": 0, "image_batch_factor": 4, "clips_per_step": 8}}),
    ({"model": {"semantic": {"teacher": None, "weight": 1.0}}}, {"model": {"semantic": {"teacher": "t.ckpt", "weight": 1.0}}}),
    ({"data": {"speakers": 0, "speaker_dropout": 0.1}}, {"data": {"speakers": 4, "speaker_dropout": 0.1}}),
    ({"model": {"net": {"speaker": None}}}, {"model": {"net": {"speaker": True}}}),
    ({"data": {"labels": "class"}}, {"data": {"labels": "attributes"}}),
    ({"model": {"loss": {"chroma": 0.0}}}, {"model": {"loss": {"chroma": 1.0}}}),
    ({"model": {"semantic": {"teacher": None, "weight": 1.0}},
      "requires": {"model.semantic.teacher": {"experiment": "visual_teacher", "when": "auto"}}},
     {"model": {"semantic": {"teacher": "auto", "weight": 1.0}},
      "requires": {"model.semantic.teacher": {"experiment": "visual_teacher", "when": "auto"}}}),
])
def test_artifact_fingerprint_ignores_new_options_left_at_their_old_behaviour(off, on):
    """The image stage, the chroma loss, the semantic audio code, the speakers, the image labels and an optional requirement
    switched off, left off, fingerprint like the configs written before them (the cached tokenizers and checkpoints are reused); switched on, they differ.
    Measured on this repo: `requires` fingerprints of video_tokenizer, audio_tokenizer, image_tokenizer and
    ernie5 equal those of the commit before the options."""
    import copy

    from tools.artifacts import fingerprint

    def content(extra):
        base = {"model": {"net": {"preset": "small"}, "optim": {"lr": 2e-3}, "loss": {"l1": 1.0}},
                "data": {"batch_size": 8}, "seed": 0, "requires": {}}  # conf/train.yaml's default
        out = copy.deepcopy(base)
        for k, v in extra.items():
            out.setdefault(k, {})
            for kk, vv in v.items():
                if isinstance(vv, dict) and isinstance(out[k].get(kk), dict):
                    out[k][kk] = {**out[k][kk], **vv}
                else:
                    out[k][kk] = vv
        return out

    before = fingerprint(content({}), ["experiment=x"])
    assert fingerprint(content(off), ["experiment=x"]) == before
    assert fingerprint(content(on), ["experiment=x"]) != before
