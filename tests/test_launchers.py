"""Sweep launchers (conf/hydra/launcher/, hydra_plugins/sparse_ar_launchers.py): their configs, the
sbatch script a SLURM sweep would submit, and a real 2-job sweep through submitit_local on CPU."""

from __future__ import annotations

import pickle
import stat
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from hydra_plugins.sparse_ar_launchers import LocalLauncher, SlurmLauncher, job_overrides_for, pinned_device
from tests.conftest import TINY, compose_train_cfg
from tests.helpers import find_metrics, read_metric, run_train_cli


def launcher_cfg(overrides: list[str], tmp_path: Path):
    return compose_train_cfg([*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.job.name=train"],
                             tmp_path / "run")


def test_launcher_configs_are_the_projects_and_check_their_keys(tmp_path):
    local = launcher_cfg(["hydra/launcher=submitit_local"], tmp_path).hydra.launcher
    assert local._target_ == "hydra_plugins.sparse_ar_launchers.LocalLauncher"
    assert local.gpus_per_node is None and local.tasks_per_node == 1 and local.trainer is None
    slurm = launcher_cfg(["hydra/launcher=submitit_slurm"], tmp_path).hydra.launcher
    assert slurm._target_ == "hydra_plugins.sparse_ar_launchers.SlurmLauncher"
    for key in ("partition", "account", "timeout_min", "gpus_per_node", "cpus_per_task", "trainer"):
        assert key in slurm
    assert slurm.trainer == "gpu" and slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1
    with pytest.raises(ConfigCompositionException, match="hydra.launcher.partiton"):
        compose_train_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"], tmp_path)


def test_job_overrides_get_the_trainer_group_and_shape_unless_given():
    assert job_overrides_for(["seed=0"], [], "gpu", 1, 1) == ["seed=0", "trainer=gpu"]
    assert job_overrides_for(["seed=0"], ["trainer=cpu"], "gpu", 1, 1) == ["seed=0"]  # the command line wins
    assert job_overrides_for(["trainer=ddp"], [], "gpu", 1, 1) == ["trainer=ddp"]  # so does the sweep
    assert job_overrides_for([], [], None, 1, 1) == []
    assert job_overrides_for([], [], "fsdp", 4, 2) == ["trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2"]
    assert job_overrides_for([], ["trainer.devices=4"], "ddp", 4, 1) == ["trainer=ddp", "trainer.num_nodes=1"]


def test_local_jobs_keep_one_device_each():
    assert [pinned_device("0,1,2", k) for k in range(4)] == ["0", "1", "2", "0"]
    assert pinned_device("", 3) == "" and pinned_device("5", 1) == "5"


def test_local_launcher_sees_this_machines_gpus_and_refuses_multi_process_jobs(tmp_path):
    cfg = launcher_cfg(["hydra/launcher=submitit_local"], tmp_path)
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, LocalLauncher) and launcher.params["gpus_per_node"] == torch.cuda.device_count()
    assert "trainer" not in launcher.params  # not a submitit parameter
    cfg = launcher_cfg(["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"], tmp_path)
    with pytest.raises(InstantiationException, match="hydra.launcher.tasks_per_node"):
        instantiate(cfg.hydra.launcher)


def test_slurm_launcher_submits_a_node_per_job_with_one_rank_per_gpu(tmp_path, monkeypatch):
    import submitit

    srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor looks for srun
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{srun.parent}:{__import__('os').environ['PATH']}")
    seen = {}

    class Done:
        def __init__(self, overrides):
            self.overrides = overrides

        def results(self):
            return [self.overrides]

    def map_array(executor, fn, overrides, *rest):
        seen["executor"] = executor
        return [Done(o) for o in overrides]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    cfg = launcher_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab",
                        "hydra.launcher.timeout_min=90", "hydra.launcher.gpus_per_node=8",
                        "hydra.launcher.tasks_per_node=8", "hydra.launcher.cpus_per_task=12",
                        "hydra.launcher.trainer=fsdp"], tmp_path)
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    jobs = launcher.launch([["seed=0"], ["seed=1", "trainer.num_nodes=2"]], initial_job_idx=0)
    assert jobs == [["seed=0", "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=1"],
                    ["seed=1", "trainer.num_nodes=2", "trainer=fsdp", "trainer.devices=8"]]
    sbatch = seen["executor"]._executor._make_submission_file_text("true", "uid")
    for line in ("--partition=gpu", "--account=lab", "--time=90", "--gpus-per-node=8", "--ntasks-per-node=8",
                 "--cpus-per-task=12", "--nodes=1", "--job-name=train"):
        assert f"#SBATCH {line}\n" in sbatch
    cfg = launcher_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=4"], tmp_path)
    with pytest.raises(InstantiationException, match="hydra.launcher.tasks_per_node=4 must equal hydra.launcher.gpus_per_node=1"):
        instantiate(cfg.hydra.launcher)


SWEEP = TINY + ["logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                "trainer.num_sanity_val_steps=0", "~callbacks.model_checkpoint", "hydra/launcher=submitit_local"]


def job_results(sweep: Path) -> list:
    """What each submitit job returned to the sweep (Hydra JobReturns), from the result pickles."""
    out = []
    for path in sorted(sweep.glob(".submitit/*/*_result.pkl")):
        status, value = pickle.loads(path.read_bytes())
        assert status == "success", value
        out.append(value)
    return out


@pytest.mark.slow
def test_optuna_sweep_through_submitit_local_runs_both_jobs_as_processes(tmp_path):
    sweep = tmp_path / "sweep"
    run_train_cli(SWEEP + ["hparams_search=lm_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                           "hydra.sweeper.sampler.n_startup_trials=1", f"data.cache_dir={tmp_path / 'cache'}",
                           f"hydra.sweep.dir={sweep}"])
    returned = {int(r.hydra_cfg.hydra.job.num): r.return_value for r in job_results(sweep)}
    assert sorted(returned) == [0, 1]  # two submitit jobs, each one Hydra job
    for num, value in returned.items():
        val = read_metric(find_metrics(sweep / str(num)), "val/loss")
        assert sorted(read_metric(find_metrics(sweep / str(num)))) == [0, 1]
        assert value == pytest.approx(val[max(val)])  # the job returned its last val/loss
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(returned.values()))
    assert "model.optim.lr" in best["best_params"]


@pytest.mark.slow
def test_submitit_local_job_refuses_in_job_ddp_relaunch(tmp_path):
    proc = run_train_cli(["-m"] + SWEEP + ["seed=0", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], check=False)
    assert proc.returncode != 0
    assert "inside a Hydra multirun" in proc.stderr + proc.stdout
    assert not list((tmp_path / "sweep").rglob("metrics.csv"))
