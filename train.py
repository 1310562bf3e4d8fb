"""Train a model from a composed Hydra config.

    python train.py                                  # the default experiment (conf/train.yaml)
    python train.py experiment=lm_tiny debug=fdr     # another experiment, one batch of each stage
    python train.py -m seed=0,1,2                    # a sweep, one job per seed

`run(cfg)` does the work and is what tests call; `main` is the thin Hydra entry.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lit_modules.schemas import register_schemas  # noqa: E402
from models.io import refuse_unsafe_pickle  # noqa: E402

register_schemas()

CONFIG_ORDER = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_dir: Path | None) -> None:
    """Print the resolved config as a rich tree and save it (and the resolved YAML) in the run dir."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in CONFIG_ORDER if k in cfg] + [k for k in cfg if k not in CONFIG_ORDER and k != "hydra"]
    for key in keys:
        branch = tree.add(key, style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        from models.io import atomic_write, atomic_write_text

        def write_tree(tmp: str) -> None:
            with open(tmp, "w") as f:
                rich.print(tree, file=f)

        atomic_write(save_dir / "config_tree.log", write_tree)
        atomic_write_text(save_dir / "resolved_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _is_multi_process(trainer_cfg: DictConfig) -> bool:
    devices = trainer_cfg.get("devices", 1)
    nodes = trainer_cfg.get("num_nodes", 1) or 1
    return str(devices) not in ("1", "[0]", "None") or int(nodes) > 1


def check_launch(cfg: DictConfig) -> None:
    """Refuse a Hydra multirun job that would re-launch itself for DDP/FSDP.

    Lightning starts extra ranks by re-running the command line; inside `-m` that re-enters the
    sweep. Sweeps over multi-device jobs go through a launcher (submitit) or torchrun, which set
    the rank environment before Hydra starts.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launched_externally = any(v in os.environ for v in ("LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"))
    if _is_multi_process(cfg.trainer) and not launched_externally:
        raise ValueError(
            "trainer.devices/trainer.num_nodes ask for several processes inside a Hydra multirun (-m): "
            "Lightning would re-launch this sweep in every rank. Run one device per job, or launch "
            "each job with torchrun/SLURM (see README, 'Sweeps')."
        )


def instantiate_dict(cfg: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every named entry of a group that has a `_target_` (null entries are dropped)."""
    if not cfg:
        return []
    out = []
    for name, node in cfg.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"{what}.{name} must be a config with a _target_, got {node!r}")
        out.append(hydra.utils.instantiate(node, _convert_="all"))
    return out


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The optimised metric as a float, for sweepers; a clear error if it was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged: {sorted(metrics)}")
    return float(metrics[name])


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build everything from `cfg`, fit, optionally test; returns (metrics, objects)."""
    check_launch(cfg)
    from tools.artifacts import ensure_requirements

    ensure_requirements(cfg)  # a frozen tokenizer / previous stage / token cache left null: built or reused
    if cfg.get("extras") and cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if cfg.get("seed") is not None:  # `is not None`: seed 0 is a seed
        L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("extras") and cfg.extras.get("print_config"):
        print_config_tree(cfg, out_dir)

    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    callbacks = instantiate_dict(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all"
    )
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}

    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        # weights only: a resumed checkpoint never unpickles code (lit_modules/checkpointing.py, models/io.py)
        ckpt_path = cfg.get("ckpt_path")
        with refuse_unsafe_pickle(ckpt_path) if ckpt_path else contextlib.nullcontext():
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(trainer.callback_metrics)
    if cfg.get("test", False):
        ckpt = None
        cb = trainer.checkpoint_callback
        if cb is not None and not trainer.fast_dev_run:
            ckpt = cb.best_model_path or cb.last_model_path or None
        with refuse_unsafe_pickle(ckpt) if ckpt else contextlib.nullcontext():
            trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update(trainer.callback_metrics)
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
    return metrics, objects


def release_process_group() -> None:
    """Destroy the default process group once a run is over (a no-op without one).

    Lightning leaves it alive. Left to interpreter shutdown, gloo's worker threads can outlive the
    objects they use, and a rank that finished cleanly then aborts at exit with SIGABRT
    ("terminate called without an active exception"), so its launcher reports a failed run.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = run(cfg)
    finally:
        release_process_group()
    name = cfg.get("optimized_metric")
    if name and name not in metrics and HydraConfig.get().mode != RunMode.MULTIRUN:
        # Only a sweeper needs the value; a single run that never validated just says so.
        warnings.warn(f"optimized_metric={name!r} was not logged (no validation ran?)", stacklevel=1)
        return None
    return metric_value(metrics, name)


if __name__ == "__main__":
    main()
