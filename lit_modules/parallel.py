"""FSDP2 with expert parallelism (`trainer=fsdp_ep`)."""

from __future__ import annotations

from lit_modules.checkpointing import AtomicModelParallelStrategy

__all__ = ["ExpertParallelStrategy"]


class ExpertParallelStrategy(AtomicModelParallelStrategy):
    """`AtomicModelParallelStrategy` (FSDP2 over all ranks, atomic distributed checkpoints) whose MoE
    experts are split over groups of `expert_parallel_size` consecutive ranks.

    Every rank still reads its own data (the sampler's data-parallel size is the world size); the
    LightningModule's configure_model passes `expert_parallel_size` to models.parallelize, which
    builds the (dp_mod_ep, ep) mesh. expert_parallel_size=1 is plain FSDP2.
    """

    def __init__(self, *args, expert_parallel_size: int = 1, **kwargs):
        if isinstance(expert_parallel_size, bool) or int(expert_parallel_size) != expert_parallel_size \
                or expert_parallel_size < 1:
            raise ValueError(f"trainer.strategy.expert_parallel_size must be a positive integer, got {expert_parallel_size!r}")
        super().__init__(*args, **kwargs)
        self.expert_parallel_size = int(expert_parallel_size)

    def setup_environment(self) -> None:
        super().setup_environment()
        tp = self.device_mesh["tensor_parallel"].size()
        dp = self.device_mesh["data_parallel"].size()
        if tp != 1:
            raise ValueError(f"trainer.strategy.tensor_parallel_size must be 1 with expert parallelism, got {tp}")
        if dp % self.expert_parallel_size:
            raise ValueError(f"trainer.strategy.expert_parallel_size={self.expert_parallel_size} must divide "
                             f"trainer.strategy.data_parallel_size={dp} (devices x nodes)")
