"""Hydra launchers for sweeps: the submitit plugin's local and SLURM launchers plus what a sweep of
this project needs from them (conf/hydra/launcher/submitit_{local,slurm}.yaml select these). Hydra
instantiates launchers only from the `hydra_plugins` namespace package, which this directory joins.

    python train.py -m hydra/launcher=submitit_local seed=0,1,2
    python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu seed=0,1,2

Both add a `trainer` field: the `trainer` config group every job uses (null: the composed one). It
becomes a `trainer=<group>` override of each job unless the command line or the sweep chose a
trainer itself. A multi-process job (tasks_per_node x nodes > 1, SLURM only) also gets
`trainer.devices=<tasks_per_node>` and `trainer.num_nodes=<nodes>` unless those are given: SLURM
starts one task per device and Lightning reads the ranks from its environment, so nothing
re-launches inside the sweep (train.check_launch refuses that).

The local launcher runs every job as its own process on this machine, one device each: with
`gpus_per_node: null` each job sees all the machine's GPUs (none on a CPU-only machine) and job k
keeps GPU k mod N. SLURM jobs get the devices SLURM allocates.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from hydra.plugins.launcher import Launcher

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _Local
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _Slurm
except ImportError as e:  # Hydra imports every plugin module at start-up: without the package, only selecting these fails
    _MISSING = e

    class _Missing(Launcher):
        def __init__(self, **params: Any) -> None:
            raise ImportError(
                "hydra/launcher=submitit_local|submitit_slurm needs hydra-submitit-launcher "
                f"(pip install hydra-submitit-launcher==1.2.0): {_MISSING}"
            )

        def setup(self, **kwargs: Any) -> None:  # never reached: __init__ raises
            raise NotImplementedError

        def launch(self, job_overrides, initial_job_idx):  # never reached: __init__ raises
            raise NotImplementedError

    _Local = _Slurm = _Missing


def _override_key(override: str) -> str:
    """'trainer' for 'trainer=ddp', '+trainer.x=1' -> 'trainer.x', '~a.b' -> 'a.b'."""
    return override.split("=", 1)[0].lstrip("~+").strip()


def job_overrides_for(
    overrides: Sequence[str], given: Sequence[str], trainer: Optional[str], tasks_per_node: int, nodes: int
) -> list[str]:
    """One job's overrides with the launcher's trainer group (and, for a multi-process job, its shape)
    appended where neither the command line (`given`) nor the sweep (`overrides`) set them."""
    keys = {_override_key(o) for o in [*given, *overrides]}
    out = list(overrides)
    if trainer and "trainer" not in keys:
        out.append(f"trainer={trainer}")
    if tasks_per_node * nodes > 1:
        if "trainer.devices" not in keys:
            out.append(f"trainer.devices={tasks_per_node}")
        if "trainer.num_nodes" not in keys:
            out.append(f"trainer.num_nodes={nodes}")
    return out


def pinned_device(visible: str, job_num: int) -> str:
    """The one entry of CUDA_VISIBLE_DEVICES that job `job_num` keeps (round robin); '' stays ''."""
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    return devices[job_num % len(devices)] if devices else visible


class _TrainerGroupMixin:
    """Takes the `trainer` field off the submitit parameters and applies it to every job."""

    def _take_trainer(self, params: dict[str, Any]) -> dict[str, Any]:
        self.trainer_group = params.pop("trainer", None)
        return params

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        given = list(self.config.hydra.overrides.task) if self.config is not None else []
        tasks = int(self.params.get("tasks_per_node") or 1)
        nodes = int(self.params.get("nodes") or 1)
        job_overrides = [job_overrides_for(o, given, self.trainer_group, tasks, nodes) for o in job_overrides]
        return super().launch(job_overrides, initial_job_idx)


class LocalLauncher(_TrainerGroupMixin, _Local):
    """Every job a process on this machine, holding one device (GPU k mod N for job k) or the CPU."""

    def __init__(self, **params: Any) -> None:
        params = self._take_trainer(dict(params))
        if int(params.get("tasks_per_node") or 1) != 1 or int(params.get("nodes") or 1) != 1:
            raise ValueError(
                "hydra.launcher.tasks_per_node and hydra.launcher.nodes must be 1 for submitit_local: local "
                "jobs are single processes (use hydra/launcher=submitit_slurm for multi-process jobs)"
            )
        if params.get("gpus_per_node") is None:
            import torch

            params["gpus_per_node"] = torch.cuda.device_count()  # 0: CUDA_VISIBLE_DEVICES='' (CPU jobs)
        super().__init__(**params)

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        # In the job's own process, before anything initialises CUDA.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            os.environ["CUDA_VISIBLE_DEVICES"] = pinned_device(visible, job_num)
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)


class SlurmLauncher(_TrainerGroupMixin, _Slurm):
    """Every job a SLURM job (of an array): one GPU, or one task per GPU of one or more nodes."""

    def __init__(self, **params: Any) -> None:
        params = self._take_trainer(dict(params))
        gpus, tasks = params.get("gpus_per_node"), int(params.get("tasks_per_node") or 1)
        if tasks > 1 and gpus is not None and int(gpus) != tasks:
            raise ValueError(
                f"hydra.launcher.tasks_per_node={tasks} must equal hydra.launcher.gpus_per_node={gpus}: "
                "a multi-GPU job runs one task (Lightning rank) per GPU"
            )
        super().__init__(**params)
