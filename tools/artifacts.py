"""Frozen artifacts an experiment needs, built on demand: a trained media tokenizer, a previous stage's
checkpoint, a token cache.

An experiment lists them under `requires` as {config key: how to build it}, e.g.

    requires:
      model.tokenizer_ckpt: {experiment: video_tokenizer}   # the final checkpoint of that experiment
      model.init_ckpt: {experiment: videoar_stage1}
      data.cache_dir: {token_cache: [experiment=videoar]}  # that data, encoded by data.tokenizer_ckpt

`train.py` calls `ensure_requirements(cfg)` first: every listed key that is null gets its artifact
(an explicit value always wins). A spec with `when: auto` is filled only where the key's value is
the string "auto", so that null can mean "none" for that key, e.g. the video tokenizer's

    model.inflate_from: auto      # conf: inflate the image tokenizer built by `requires`
    requires:
      model.inflate_from: {experiment: image_tokenizer, when: auto}

which `model.inflate_from=null` (train from scratch) or a path turns off. `inherit: [keys]` passes
the run's own values of those keys on to the build (the image tokenizer gets the video tokenizer's
architecture and frame size, so that one inflates into the other). An artifact is built once per fingerprint (of the composed config
that builds it) under `paths.artifacts_dir`, written atomically and under a file lock, and reused
after; the log says which. Under a `debug` mode it is built in that mode too (fast_dev_run: one
batch); tokenizer / stage runs use the run's single-device trainer (cpu or gpu). The run's seed is
not passed on: every seed of a sweep shares one frozen tokenizer (give `overrides` to change that).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

log = logging.getLogger("artifacts")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WAIT_S = 3600  # how long a non-zero rank waits for rank zero's build


def ensure_requirements(cfg: DictConfig) -> dict[str, str]:
    """Fill each null key of `cfg.requires` with its artifact (building it if needed); returns {key: path}."""
    requires = cfg.get("requires") or {}
    filled = {}
    for key, spec in requires.items():
        spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
        when = spec.pop("when", None)
        if when not in (None, "auto"):
            raise ValueError(f"requires.{key}.when must be null or 'auto', got {when!r}")
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value != "auto" if when == "auto" else value not in (None, "???"):
            continue  # set explicitly (or, under `when: auto`, null = none): it wins
        if "experiment" in spec:
            inherit = {k: OmegaConf.select(cfg, k) for k in spec.get("inherit") or []}
            path = experiment_checkpoint(cfg, str(spec["experiment"]), list(spec.get("overrides") or []), inherit)
        elif "token_cache" in spec:
            tok = spec.get("tokenizer_key", "data.tokenizer_ckpt")
            tokenizer = OmegaConf.select(cfg, tok)
            if tokenizer is None:
                raise ValueError(f"requires.{key}: a token cache needs {tok} (list it before {key} in requires)")
            path = token_cache(cfg, str(tokenizer), list(spec["token_cache"]))
        else:
            raise ValueError(f"requires.{key} must give `experiment` or `token_cache`, got {sorted(spec)}")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, str(path), force_add=True)
        filled[key] = str(path)
    return filled


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def override_value(v: Any) -> str:
    """A config value written as a Hydra command-line override value."""
    if isinstance(v, (DictConfig, dict)):
        raise ValueError(f"inherit takes leaf keys, got a mapping {v}")
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return v if re.fullmatch(r"[\w./-]+", v) else json.dumps(v)
    return "[" + ",".join(override_value(x) for x in v) + "]"


# ----------------------------------------------------------------------------------- builders


def inherited_overrides(cfg: DictConfig) -> list[str]:
    """What a build takes from the run that needs it: its debug mode and single-device trainer."""
    out = []
    choices = _choices(cfg)
    if choices.get("debug"):
        out.append(f"debug={choices['debug']}")
    trainer = choices.get("trainer")
    if trainer in ("gpu", "ddp", "fsdp"):
        import torch

        out.append("trainer=gpu" if torch.cuda.is_available() else "trainer=cpu")
    return out


def experiment_checkpoint(cfg: DictConfig, experiment: str, extra: list[str], inherit: dict | None = None) -> Path:
    """The final checkpoint of `experiment` run with the inherited overrides (+ extra).

    inherit: {key: value} the build must share with the run; only values that differ from what the
    experiment composes to become overrides, so a run at the defaults reuses the default build.
    """
    overrides = [f"experiment={experiment}", *inherited_overrides(cfg), *extra]
    sub = compose(overrides + ["extras.print_config=false", "test=false"])
    differ = [f"{k}={override_value(v)}" for k, v in (inherit or {}).items()
              if _plain(OmegaConf.select(sub, k)) != _plain(v)]
    if differ:
        overrides += differ
        sub = compose(overrides + ["extras.print_config=false", "test=false"])
    fp = fingerprint({k: sub.get(k) for k in ("model", "data", "trainer", "seed", "requires")}, overrides)
    out = artifacts_dir(cfg) / f"{experiment}-{fp}"
    target = out / "final.ckpt"

    def build() -> None:
        import train  # the entry point itself: the build is an ordinary run

        run_dir = out / "run"
        with open_dict(sub):
            sub.hydra.runtime.output_dir = str(run_dir)
            sub.paths.output_dir = str(run_dir)
            sub.paths.artifacts_dir = str(artifacts_dir(cfg))
        with _hydra_config(sub):
            ensure_requirements(sub)
            _, objects = train.run(sub)
        # the trainer's final state (also under fast_dev_run, which writes no checkpoints of its own),
        # written atomically by the trainer's AtomicCheckpointIO plugin (conf/trainer/default.yaml)
        objects["trainer"].save_checkpoint(target)

    return _build_once(target, build, " ".join(overrides), fp)


def token_cache(cfg: DictConfig, tokenizer_ckpt: str, data_overrides: list[str]) -> Path:
    """A token cache of the data selected by `data_overrides`, encoded by the tokenizer checkpoint."""
    from models.tokenizers.checkpoint import file_sha256

    fp = fingerprint({"tokenizer": file_sha256(tokenizer_ckpt)}, data_overrides)
    out = artifacts_dir(cfg) / f"tokens-{fp}"
    target = out / "manifest.json"

    def build() -> None:
        from tools.tokenize_dataset import tokenize

        tokenize(tokenizer_ckpt, str(out), data_overrides)  # shards and manifest written atomically

    _build_once(target, build, f"token cache of {' '.join(data_overrides)} by {tokenizer_ckpt}", fp)
    return out


# ----------------------------------------------------------------------------------- helpers


def artifacts_dir(cfg: DictConfig) -> Path:
    path = OmegaConf.select(cfg, "paths.artifacts_dir") or str(ROOT / "data" / "cache" / "artifacts")
    return Path(path)


def _drop_inert(content: dict) -> dict:
    """Leave out config keys that cannot change what is built, so that adding an option with a
    default that keeps the old behaviour does not rebuild every artifact:

    - `model.optim.schedule` when it is `cosine` (the only schedule before the option existed) and,
      with it, its `decay_fraction` (read by `wsd` only);
    - the visual tokenizer's `model.loss.chroma` at 0 (the loss before the option);
    - the visual tokenizer's image stage when off (`model.image_steps` 0, with `image_batch_factor`,
      and `clips_per_step` when null);
    - the audio tokenizer's `model.semantic` when it has no teacher;
    - the image DataModule's `labels` at `class` (the labels before the option);
    - a `requires` entry with `when: auto` whose key is null (the option it builds for is off: e.g. the
      visual tokenizer's semantic teacher);
    - ERNIE 5.0's speakers when off (`data.speakers` 0, with `speaker_dropout`) and `model.net.speaker`
      when null (from the data).
    """
    model = content.get("model") if isinstance(content.get("model"), dict) else {}
    data = content.get("data") if isinstance(content.get("data"), dict) else {}
    requires = content.get("requires")
    if isinstance(requires, dict):
        for key in [k for k, spec in requires.items() if isinstance(spec, dict) and spec.get("when") == "auto"]:
            node: Any = content
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:  # an optional requirement switched off: nothing is built for it
                requires.pop(key)
    optim = model.get("optim")
    if isinstance(optim, dict) and optim.get("schedule", "cosine") == "cosine":
        optim.pop("schedule", None)
        optim.pop("decay_fraction", None)
    if model.get("image_steps", None) == 0:
        model.pop("image_steps")
        model.pop("image_batch_factor", None)
        if model.get("clips_per_step", 0) is None:
            model.pop("clips_per_step")
    loss = model.get("loss")
    if isinstance(loss, dict) and loss.get("chroma", None) == 0:
        loss.pop("chroma")
    semantic = model.get("semantic")
    if isinstance(semantic, dict) and semantic.get("teacher") is None:
        model.pop("semantic")
    if data.get("labels", None) == "class":  # the image DataModule's labels; tokenizers never read them
        data.pop("labels")
    if data.get("speakers", None) == 0:
        data.pop("speakers")
        data.pop("speaker_dropout", None)
    net = model.get("net")
    if isinstance(net, dict) and "speaker" in net and net["speaker"] is None:
        net.pop("speaker")
    return content


def fingerprint(content: Any, overrides: list[str]) -> str:
    """Hash of what defines an artifact: the config that builds it and its overrides.

    Interpolations are hashed as written (`${paths.output_dir}` and the like name where a run
    writes, which is not what it builds); the values they stand for come in through their own keys.
    Keys that cannot change the result are left out (`_drop_inert`).
    """
    if isinstance(content, dict):
        content = _drop_inert({k: (OmegaConf.to_container(v, resolve=False) if isinstance(v, DictConfig) else v)
                               for k, v in content.items()})
    blob = json.dumps({"content": content, "overrides": sorted(overrides)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def compose(overrides: list[str]) -> DictConfig:
    """conf/train.yaml under these overrides (with the hydra node), inside a running app or not."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lit_modules.schemas import register_schemas

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def _choices(cfg: DictConfig) -> dict:
    choices = OmegaConf.select(cfg, "hydra.runtime.choices")
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choices = HydraConfig.get().runtime.choices
    return dict(choices or {})


@contextlib.contextmanager
def _hydra_config(sub: DictConfig) -> Iterator[None]:
    """Make `sub` the current HydraConfig for a nested run, then restore the parent's."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(sub)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = saved


def _build_once(target: Path, build, what: str, fp: str) -> Path:
    """Reuse `target` if present; else build it under a lock (rank zero only; other ranks wait)."""
    if target.exists():
        log.info("requires: reusing %s (fingerprint %s) for %s", target, fp, what)
        return target
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0)
    if rank != 0:
        deadline = time.monotonic() + WAIT_S
        while not target.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: {target} was not built by rank 0 within {WAIT_S} s")
            time.sleep(2)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same artifact: wait for it
        if target.exists():
            log.info("requires: reusing %s (fingerprint %s) for %s", target, fp, what)
            return target
        start = time.monotonic()
        log.info("requires: building %s (fingerprint %s) into %s", what, fp, target.parent)
        build()
        log.info("requires: built %s in %.1f s: %s", what, time.monotonic() - start, target)
    return target
