"""GPU-only paths: one training step and one generation for every family on CUDA, FlexAttention on CUDA
against the explicit mask, random draws with CUDA (and CPU) generators, compiled blocks with inductor.

Marked `gpu`: skipped without CUDA (tests/conftest.py); `make gpu-test` runs exactly these.
"""

from __future__ import annotations

import pytest
import torch

import train
from tests.conftest import TINY, compose_train_cfg
from tests.helpers import find_metrics, read_metric

pytestmark = pytest.mark.gpu

GPU = ["trainer=gpu", "logger=csv", "test=false", "trainer.max_steps=2", "trainer.val_check_interval=2",
       "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def _losses(run_dir) -> dict:
    losses = read_metric(find_metrics(run_dir))
    assert sorted(losses) == [0, 1] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    return losses


@pytest.mark.parametrize("ffn", ["dense", "moe", "moue"])
def test_lm_trains_and_generates_on_cuda(ffn, tmp_path, data_cache):
    sparse = ["model.net.moe.num_experts=4", "model.net.moe.expert_hidden=64", "model.net.moue.window=2",
              "model.net.moue.state_dim=16"] if ffn != "dense" else []
    cfg = compose_train_cfg(TINY + GPU + [f"model.net.ffn={ffn}", *sparse], tmp_path / "run", data_cache)
    _, objects = train.run(cfg)
    _losses(tmp_path / "run")
    module = objects["model"].cuda().eval()
    for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        text = module.generate_text(["Born in"], generator=gen, max_new_tokens=8)[0]
        assert text.startswith("Born in")


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_videoar_trains_with_frame_mask_and_cfec_and_generates_on_cuda(ffn, tokenizer, tmp_path):
    """The Random Frame Mask drew with a CUDA generator into a CPU tensor and raised before the fix."""
    cfg = compose_train_cfg(
        ["experiment=videoar" if ffn == "dense" else "experiment=videoar_moe", f"model.tokenizer_ckpt={tokenizer}",
         "model.net.preset=tiny", "data.image_size=16", "data.num_frames=5", "data.num_clips=8", "data.batch_size=4",
         "model.sample.num_clips=2", "model.frame_mask_prob=0.3", "model.cfec.enabled=true", *GPU,
         "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=64"],
        tmp_path / "run")
    _, objects = train.run(cfg)
    _losses(tmp_path / "run")
    module = objects["model"].cuda().eval()
    labels = torch.tensor([0, 1], device="cuda")
    for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        tokens, video = module.generate_clips(labels, 2, gen)
        assert video.is_cuda and torch.isfinite(video).all()


@pytest.mark.parametrize("experiment", ["video_tokenizer", "audio_tokenizer"])
def test_media_tokenizers_train_a_step_on_cuda(experiment, tmp_path):
    data = ["data.num_clips=8", "data.batch_size=4"] + (["model.inflate_from=null"] if experiment == "video_tokenizer" else [])
    cfg = compose_train_cfg([f"experiment={experiment}", *data, *GPU, "~callbacks.rich_progress_bar",
                             "extras.print_config=false"], tmp_path / "run")
    metrics, _ = train.run(cfg)
    assert torch.isfinite(torch.tensor(metrics.get("train/loss", metrics.get("train/loss_total"))))


@pytest.mark.parametrize("layout", ["video", "documents"])
def test_flex_attention_on_cuda_equals_the_explicit_mask(layout):
    from models.layers.attention import attend
    from models.layers.mask import AttentionMask, block_layout

    if layout == "video":
        block, _ = block_layout(1, [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)], 4)
        mask = AttentionMask.blocks(block.cuda())
        L = block.numel()
    else:
        L = 1000
        mask = AttentionMask.documents((torch.arange(L) // 300).cuda())
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, L, 32, device="cuda", generator=g, requires_grad=True)
    k = torch.randn(2, 2, L, 32, device="cuda", generator=g, requires_grad=True)
    v = torch.randn(2, 2, L, 32, device="cuda", generator=g, requires_grad=True)
    want = attend(q, k, v, mask.plan(L, L, impl="sdpa", device="cuda"))
    got = attend(q, k, v, mask.plan(L, L, impl="flex", device="cuda"))
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    gw = torch.autograd.grad(want.sum(), (q, k, v))
    gg = torch.autograd.grad(got.sum(), (q, k, v))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)


def test_random_draws_follow_the_generator_device():
    from models.layers.mask import frame_mask_keep
    from models.random import multinomial, uniform

    for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        assert uniform((3, 4), gen, "cuda").is_cuda
        assert frame_mask_keep(2, 3, 0.5, gen, torch.device("cuda")).is_cuda
        assert multinomial(torch.full((2, 5), 0.2, device="cuda"), 1, gen).is_cuda


def test_regional_compile_with_inductor_matches_eager_on_cuda(tmp_path, data_cache):
    losses = {}
    for mode in ("eager", "compiled"):
        extra = ["model.compile=true"] if mode == "compiled" else []
        cfg = compose_train_cfg(TINY + GPU + ["trainer.precision=32-true", "model.net.dropout=0.0", *extra],
                                tmp_path / mode, data_cache)
        train.run(cfg)
        losses[mode] = _losses(tmp_path / mode)
    for step, value in losses["eager"].items():
        assert abs(losses["compiled"][step] - value) <= 1e-4


def test_elastic_moe_lm_trains_and_decodes_sub_models_on_cuda(tmp_path, data_cache):
    sparse = ["model.net.ffn=moe", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=64", "model.net.n_layers=3",
              "+callbacks/elastic=default", "callbacks.elastic.depth_full_prob=0", "callbacks.elastic.width_full_prob=0",
              "callbacks.elastic.sparsity_full_prob=0"]
    cfg = compose_train_cfg(TINY + GPU + sparse, tmp_path / "run", data_cache)
    _, objects = train.run(cfg)
    _losses(tmp_path / "run")
    from models.layers.elastic import RoutingLimit

    model = objects["model"].model.cuda().eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5), device="cuda")
    sub = dict(layers=[0, 2], routing=RoutingLimit([[0, 1]] * 3, 1))
    assert torch.equal(model.generate(prompt, 6, temperature=0.0, **sub),
                       model.generate(prompt, 6, temperature=0.0, use_cache=False, **sub))


def test_ernie3_trains_every_task_and_generates_on_cuda(tmp_path, data_cache):
    """Padding masks run FlexAttention on CUDA (the CPU path is 'segments')."""
    cfg = compose_train_cfg(["experiment=ernie3_tiny", "data.num_people=60", "data.tokenizer=byte", "data.seq_len=64",
                             "data.dlm_segments=2", "data.batch_size=4", *GPU, "trainer.max_steps=10",
                             "trainer.val_check_interval=10", "trainer.limit_val_batches=5"], tmp_path / "run", data_cache)
    _, objects = train.run(cfg)
    csv = find_metrics(tmp_path / "run")
    assert len(read_metric(csv)) == 10 and read_metric(csv, "val/loss")
    module = objects["model"].cuda().eval()
    assert module.generate_text(["Born in"], max_new_tokens=4)[0].startswith("Born in")


def test_expert_parallel_layer_on_one_cuda_rank_equals_the_plain_layer(tmp_path):
    """The EP dispatch path (sort, all-to-all, grouped kernels, combine) on a 1-rank NCCL group."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from models.moe.layer import MoEConfig, MoELayer

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = MoELayer(32, MoEConfig(num_experts=4, top_k=2, expert_hidden=64, num_shared=1)).cuda()
        ep = copy.deepcopy(ref)
        ep.enable_expert_parallel(init_device_mesh("cuda", (1,)))
        x = torch.randn(2, 7, 32, device="cuda", requires_grad=True)
        x_ep = x.detach().clone().requires_grad_(True)
        (y, _), (y_ep, _) = ref(x), ep(x_ep)
        assert torch.allclose(y, y_ep, atol=1e-5)
        y.square().sum().backward()
        y_ep.square().sum().backward()
        assert torch.allclose(x.grad, x_ep.grad, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_mfu_benchmark_quick_on_cuda():
    """benchmarks/mfu.py's CUDA path (FSDP2 on one device, bf16, eager and compiled) on tiny models."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "mfu.py"), "--quick"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout[out.stdout.index("{"):])
    assert "skipped" not in res and res["results"]
    assert all(r.get("mfu", 0) > 0 for r in res["results"] if "skipped" not in r)
