"""Expert-parallel MoE layer vs the single-process layer, on 2 gloo CPU processes.

    python tests/ep_layer_worker.py IMPL      (IMPL: loop | grouped_mm)

Every rank builds the same layer and the inputs of every rank. The reference runs the plain layer
on each rank's tokens in turn and backpropagates the sum of the ranks' losses; the expert-parallel
layer runs only this rank's tokens. Checked per rank: outputs, input gradients, routed counts and
the layer's loss; after summing over ranks: router and shared-expert gradients; each local expert's
weights and gradients against its slice of the reference; the aux-loss-free bias after one update
from the all-reduced counts. Routing is made deliberately uneven (a biased router, ranks with
different token counts, an expert no token picks). Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.moe.layer import MoEConfig, MoELayer  # noqa: E402

WORLD = 2
D, E, K = 16, 4, 2


def close(a: torch.Tensor, b: torch.Tensor, what: str, rank: int, tol: float = 2e-5) -> None:
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape or not torch.allclose(a, b, atol=tol, rtol=tol):
        err = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        raise AssertionError(f"rank {rank}: {what} differs from the single-process layer (max abs err {err})")


def run(rank: int, init_file: str, impl: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=24, num_shared=1, shared_hidden=8, impl=impl,
                    aux_loss_coef=1e-2, z_loss_coef=1e-3, bias_balancing=True, bias_update_rate=0.1)
    ref = MoELayer(D, cfg)
    # Uneven: expert 3 is picked by every token, expert 0 by none; the rest split the second slot.
    ref.router.expert_bias.copy_(torch.tensor([-10.0, 0.0, 0.0, 10.0]))
    ep_layer = copy.deepcopy(ref)
    xs = [torch.randn(n, t, D) for n, t in ((1, 7), (13, 1))]
    gs = [torch.randn_like(x) for x in xs]

    ys, xgrads, infos = [], [], []
    total = 0
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_()
        y, info = ref(x)
        total = total + (y * g).sum() + info.loss
        ys.append(y)
        xgrads.append(x)
        infos.append(info)
    total.backward()

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    ep_layer.enable_expert_parallel(mesh)
    El = E // WORLD
    lo, hi = rank * El, (rank + 1) * El
    for name in ("w13", "w2"):
        w = getattr(ep_layer.experts, name)
        assert w.to_local().shape[0] == El and tuple(w.shape) == tuple(getattr(ref.experts, name).shape)
        close(w.to_local(), getattr(ref.experts, name)[lo:hi], f"local expert {name}", rank, 0)
    assert ep_layer.experts.num_local_experts == El

    x = xs[rank].clone().requires_grad_()
    y, info = ep_layer(x)
    ((y * gs[rank]).sum() + info.loss).backward()

    close(y, ys[rank], "output", rank)
    close(x.grad, xgrads[rank].grad, "input gradient", rank)
    close(info.loss, infos[rank].loss, "layer loss", rank)
    assert torch.equal(info.counts, infos[rank].counts), (rank, info.counts, infos[rank].counts)
    counts_all = torch.stack([i.counts for i in infos])
    assert counts_all[:, 0].sum() == 0 and (counts_all[:, 3] == torch.tensor([7, 13])).all(), counts_all

    for name, p in ep_layer.named_parameters():
        if "experts" in name:
            continue
        g = p.grad.clone()
        dist.all_reduce(g)
        close(g, dict(ref.named_parameters())[name].grad, f"summed gradient of {name}", rank)
    for name in ("w13", "w2"):
        g = getattr(ep_layer.experts, name).grad
        assert g is not None and g.to_local().shape[0] == El
        close(g.to_local(), getattr(ref.experts, name).grad[lo:hi], f"local expert gradient {name}", rank)
    if rank == 0:  # expert 0 got no token: its gradient is exactly zero, expert 1's is not
        assert not g.to_local()[0].any() and g.to_local()[1].any()

    # No gradient needed (eval): same output (before the bias moves routing).
    with torch.no_grad():
        y2, _ = ep_layer(xs[rank])
    close(y2, ys[rank], "no-grad output", rank)

    # Aux-loss-free bias: counts summed over ranks give every rank the reference's update.
    counts = info.counts.float()
    dist.all_reduce(counts)
    ep_layer.router.update_bias(counts)
    ref.router.update_bias(counts_all.sum(0).float())
    close(ep_layer.router.expert_bias, ref.router.expert_bias, "expert bias after update", rank, 0)
    biases = [torch.empty(E) for _ in range(WORLD)]
    dist.all_gather(biases, ep_layer.router.expert_bias)
    assert torch.equal(biases[0], biases[1]), biases

    dist.barrier()
    if rank == 0:
        print(f"EP layer OK impl={impl} counts={counts.tolist()}", flush=True)
    dist.destroy_process_group()
    # Every check has passed. Leave without interpreter teardown: a gloo worker thread that is still
    # joinable there aborts the process ("terminate called without an active exception", SIGABRT),
    # intermittently and after the group is destroyed (seen in CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    impl = sys.argv[1] if len(sys.argv) > 1 else "loop"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(os.path.join(d, "init"), impl), nprocs=WORLD, join=True)
