"""ERNIE 5.0 training throughput: the sparse MoE trunk against a dense one of equal activated size, and
what the per-sample heterogeneous attention masks cost.

1. MoE vs dense: `models.ernie5.Ernie5` with its preset's ultra-sparse MoE trunk (ffn=moe) against the
   same config with ffn=dense, its ffn_hidden (a multiple of 8) solved so that `num_params()["activated"]`
   matches the MoE model's as closely as possible. Both train on the SAME fixed list of packed
   multimodal batches (`datamodules.multimodal.MultimodalDataModule` rows of the seven tasks over
   random-weight tokenizers saved to a temp dir, or the tokenizers given). One timed call = one pass
   over the list; a step = forward + loss (text CE + 0.3 MTP CE + bitwise image / video loss with
   Infinity scale weights + audio CE + the balance loss, as `Ernie5Module._losses` forms them, without
   posterior weighting) + backward + AdamW step (+ the routers' aux-loss-free bias update for the MoE).
   The VideoAR teacher-forced inputs / labels are tokenizer work, computed once outside the timing.
   Tokens/s counts non-pad tokens (kind >= 0). A/B timings alternate in one process (order flipped
   each pair); ratios are medians of per-pair ratios; a MoE-vs-MoE pair gives the A/A noise floor.
2. Masks: the MoE trunk's forward + backward of hidden.sum() over one embedded batch with the batch's
   own mask (`batch.mask()`: block ids + document ids) against plain causal attention
   (`AttentionMask()`, SDPA is_causal), under the trunk's default attn_impl on this device (CPU:
   'segments') and 'sdpa' (dense boolean masks). Before timing, the structured mask's output under
   'segments' must equal 'sdpa' to 1e-5.

    python benchmarks/ernie5_throughput.py            # the `ernie5` experiment's shape: small, 8 x 512
    python benchmarks/ernie5_throughput.py --quick    # smoke run (tiny preset, 2 x 192)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from models.ernie5 import Ernie5, Ernie5Config, UnifiedBatch  # noqa: E402
from models.layers.mask import AttentionMask  # noqa: E402
from models.videoar import bitwise_loss, scale_token_weights, teacher_forcing_sequence  # noqa: E402

MTP_WEIGHT = 0.3  # the 8K stage's
EQUIV_TOL = 1e-5
# data shapes: quick = the tests' tiny corpus; full = the `ernie5` experiment's rows (small tokenizers)
MODES = {
    "quick": dict(preset="tiny", tokenizer_preset="tiny", seq_len=192, batch_size=2, batches=2, repeats=2,
                  data=dict(image_size=16, num_frames=5, clip_seconds=0.5, num_videos=12, num_images=12,
                            num_audio=12, val_videos=4, val_images=4, val_audio=4, num_people=40,
                            vocab_size=400, text_len=48)),
    "full": dict(preset="small", tokenizer_preset="small", seq_len=512, batch_size=8, batches=4, repeats=5,
                 data=dict(image_size=32, num_frames=9, clip_seconds=1.0, num_videos=32, num_images=32,
                           num_audio=32, val_videos=4, val_images=4, val_audio=4)),
}


# ------------------------------------------------------------------------------------------- data


def random_tokenizers(root: Path, preset: str) -> tuple[str, str]:
    """Untrained visual (3D) and audio tokenizer exports of `preset`, saved under root."""
    from models.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
    from models.tokenizers.checkpoint import save_tokenizer_export
    from models.tokenizers.visual import TokenizerConfig, VisualTokenizer

    torch.manual_seed(0)
    vcfg, acfg = TokenizerConfig(preset=preset), AudioTokenizerConfig(preset=preset)
    vpath, apath = root / f"{preset}_video_tokenizer.pt", root / f"{preset}_audio_tokenizer.pt"
    save_tokenizer_export(vpath, VisualTokenizer(vcfg), "visual", vcfg.to_dict())
    save_tokenizer_export(apath, AudioTokenizer(acfg), "audio", acfg.to_dict())
    return str(vpath), str(apath)


def fixed_batches(vpath: str, apath: str, cache: Path, mode: dict, device: torch.device):
    """(vis tokenizer, audio tokenizer, vocabulary size, [(batch, teacher-forced spans)]): the fixed
    batches both arms train on, rows 0 .. batches * batch_size - 1 of the train split."""
    from datamodules.multimodal import MultimodalDataModule, collate_rows
    from models.tokenizers.checkpoint import load_media_tokenizer

    B, n = mode["batch_size"], mode["batches"]
    dm = MultimodalDataModule(vpath, apath, cache_dir=str(cache), seq_len=mode["seq_len"], batch_size=B,
                              train_rows=B * n, val_rows=1, **mode["data"])
    dm.setup()
    vtok, _ = load_media_tokenizer(vpath, expect_kind="visual")
    atok, _ = load_media_tokenizer(apath, expect_kind="audio")
    ds = dm.datasets["train"]
    data = []
    with torch.no_grad():
        for i in range(n):
            batch = collate_rows([ds[i * B + j] for j in range(B)])
            tf = [teacher_forcing_sequence(vtok.quantizer, s.latents.float()) for s in batch.vis_gen]
            tf = [{"inputs": t["inputs"].to(device), "labels": t["labels"].to(device)} for t in tf]
            data.append((batch.to(device), tf))
    return vtok, atok, len(dm.vocab), data


# ---------------------------------------------------------------------------------------- networks


def build_net(base: dict, device: torch.device, **over) -> Ernie5:
    torch.manual_seed(0)
    return Ernie5(Ernie5Config.from_dict({**base, **over})).to(device)


def dense_hidden_for(base: dict, target: int) -> int:
    """The dense ffn_hidden (multiple of 8) whose activated count is nearest `target` (counts are
    linear in ffn_hidden: two builds give the line)."""
    p8, p16 = (build_net(base, torch.device("cpu"), ffn="dense", ffn_hidden=h).num_params()["activated"]
               for h in (8, 16))
    slope = (p16 - p8) / 8
    h = 8 + (target - p8) / slope
    lo = max(8, int(h // 8) * 8)
    return min((lo, lo + 8), key=lambda c: abs(p8 + (c - 8) * slope - target))


def train_loss(net: Ernie5, batch: UnifiedBatch, tf: list) -> tuple[torch.Tensor, list]:
    """The training loss of `Ernie5Module._losses` / `_total` (no posterior weighting), plus balance."""
    out = net(batch, [t["inputs"] for t in tf])
    loss = out.balance_loss
    if out.text_targets.numel():
        loss = loss + F.cross_entropy(out.text_logits.float(), out.text_targets)
    if out.mtp_logits is not None and out.mtp_targets.numel():
        loss = loss + MTP_WEIGHT * F.cross_entropy(out.mtp_logits.float(), out.mtp_targets)
    vis: dict = {}
    for spans, t in zip(batch.vis_gen, tf):
        w = scale_token_weights(net.scales, spans.latents.shape[1], "infinity")
        part, _ = bitwise_loss(out.vis[spans.task], t["labels"], w)
        s, n = vis.get(spans.task.split("_")[0], (0.0, 0))
        vis[spans.task.split("_")[0]] = (s + part * spans.dest.shape[0], n + spans.dest.shape[0])
    for s, n in vis.values():
        loss = loss + s / n
    a_sum, a_n = 0.0, 0
    for logits, codes in out.audio.values():
        ce = torch.stack([F.cross_entropy(lg.float().flatten(0, 1), codes[..., j].reshape(-1))
                          for j, lg in enumerate(logits)]).mean()
        a_sum, a_n = a_sum + ce * codes.shape[0] * codes.shape[1], a_n + codes.shape[0] * codes.shape[1]
    if a_n:
        loss = loss + a_sum / a_n
    return loss, out.routing


def train_pass(net: Ernie5, opt: torch.optim.Optimizer, data: list):
    """One call = one training step per fixed batch."""
    def run() -> None:
        for batch, tf in data:
            opt.zero_grad(set_to_none=True)
            loss, routing = train_loss(net, batch, tf)
            loss.backward()
            opt.step()
            if routing:  # aux-loss-free balancing, once per optimizer step (as TrunkModule does)
                net.trunk.update_router_bias(torch.stack([i.counts for i in routing]).float())
    return run


def pair_stats(ta: list[float], tb: list[float]) -> tuple[float, list[float]]:
    r = [b / a for a, b in zip(ta, tb)]
    return statistics.median(r), [min(r), max(r)]


# -------------------------------------------------------------------------------------- the parts


def moe_vs_dense(base: dict, data: list, repeats: int, device: torch.device) -> tuple[dict, dict, Ernie5]:
    moe = build_net(base, device, ffn="moe").train()
    target = moe.num_params()["activated"]
    hidden = dense_hidden_for(base, target)
    dense = build_net(base, device, ffn="dense", ffn_hidden=hidden).train()
    pm, pd = moe.num_params(), dense.num_params()
    step_moe = train_pass(moe, torch.optim.AdamW(moe.parameters(), lr=1e-4), data)
    step_dense = train_pass(dense, torch.optim.AdamW(dense.parameters(), lr=1e-4), data)
    tokens = sum(int((b.kind >= 0).sum()) for b, _ in data)
    tm, td = alternate(step_moe, step_dense, repeats, device)
    ratio, spread = pair_stats(tm, td)
    aa_a, aa_b = alternate(step_moe, step_moe, repeats, device)
    aa, aa_spread = pair_stats(aa_a, aa_b)
    params = {"moe": pm, "dense": pd, "dense_ffn_hidden": hidden,
              "dense_over_moe_activated": pd["activated"] / pm["activated"]}
    throughput = {"tokens_per_pass": tokens, "steps_per_pass": len(data),
                  "moe_tokens_per_s": tokens / statistics.median(tm),
                  "dense_tokens_per_s": tokens / statistics.median(td),
                  "dense_over_moe_time_ratio": ratio, "spread": spread,
                  "aa_ratio": aa, "aa_spread": aa_spread}
    return params, throughput, moe


def mask_cost(net: Ernie5, batch: UnifiedBatch, tf: list, repeats: int, device: torch.device) -> dict:
    trunk, cfg = net.trunk, net.trunk.cfg
    with torch.no_grad():
        x = net.embed(batch, [t["inputs"] for t in tf])
    S = x.shape[1]
    real, causal = batch.mask(), AttentionMask()
    default_impl = trunk.attn_impl(x.device)
    saved = cfg.attn_impl

    def fwd_bwd(mask: AttentionMask):
        def run() -> None:
            net.zero_grad(set_to_none=True)
            trunk(x, batch.positions, mask).hidden.sum().backward()
        return run

    try:
        outs = {}
        with torch.no_grad():
            for impl in ("segments", "sdpa"):
                cfg.attn_impl = impl
                outs[impl] = trunk(x, batch.positions, real).hidden
        diff = float((outs["segments"] - outs["sdpa"]).abs().max())
        assert diff < EQUIV_TOL, f"'segments' and 'sdpa' differ by {diff} on the structured mask"
        res = {}
        for impl in dict.fromkeys([default_impl, "sdpa"]):
            cfg.attn_impl = impl
            tm, tc = alternate(fwd_bwd(real), fwd_bwd(causal), repeats, device)
            ratio, spread = pair_stats(tc, tm)
            aa_a, aa_b = alternate(fwd_bwd(real), fwd_bwd(real), repeats, device)
            aa, aa_spread = pair_stats(aa_a, aa_b)
            plan = real.plan(S, S, 0, impl, x.device)
            res[impl] = {"plan": plan.kind, "mask_bytes": plan.nbytes(), "masked_over_causal": ratio,
                         "spread": spread, "aa_ratio": aa, "aa_spread": aa_spread,
                         "masked_s": statistics.median(tm), "causal_s": statistics.median(tc)}
    finally:
        cfg.attn_impl = saved
    return {"default_impl": default_impl, "documents_per_row": [int(d.unique().numel()) for d in batch.doc_ids],
            "impls": res, "max_abs_diff_segments_vs_sdpa": diff}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--visual-tokenizer", default=None, help="a visual tokenizer export (default: random)")
    ap.add_argument("--audio-tokenizer", default=None, help="an audio tokenizer export (default: random)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: all cores; --quick: 1, a smoke run beside other work)")
    args = ap.parse_args(argv)
    if bool(args.visual_tokenizer) != bool(args.audio_tokenizer):
        ap.error("give both --visual-tokenizer and --audio-tokenizer, or neither")
    mode = MODES["quick" if args.quick else "full"]
    repeats = args.repeats or mode["repeats"]
    device = torch.device(args.device)
    threads = args.threads or (1 if args.quick else min(torch.get_num_threads(), os.cpu_count() or 1))
    torch.set_num_threads(max(1, threads))
    with tempfile.TemporaryDirectory(prefix="ernie5_bench_") as tmp:
        root = Path(tmp)
        if args.visual_tokenizer:
            vpath, apath, random_tok = args.visual_tokenizer, args.audio_tokenizer, False
        else:
            vpath, apath = random_tokenizers(root, mode["tokenizer_preset"])
            random_tok = True
        vtok, atok, vocab, data = fixed_batches(vpath, apath, root / "cache", mode, device)
    base = dict(preset=mode["preset"], text_vocab=vocab, bits=vtok.cfg.dim, latent_dim=vtok.cfg.dim,
                scales=[list(s) for s in vtok.scales], audio_levels=atok.cfg.num_quantizers,
                audio_codebook=atok.cfg.codebook_size)
    params, throughput, moe = moe_vs_dense(base, data, repeats, device)
    masks = mask_cost(moe, *data[0], repeats, device)
    out = {
        "benchmark": "ernie5_throughput",
        "config": {"mode": "quick" if args.quick else "full", "preset": mode["preset"],
                   "seq_len": mode["seq_len"], "batch_size": mode["batch_size"], "batches": mode["batches"],
                   "repeats": repeats, "random_tokenizers": random_tok,
                   "tokenizer_preset": mode["tokenizer_preset"] if random_tok else None,
                   "net": {k: v for k, v in base.items() if k != "scales"}, "scales": base["scales"],
                   "moe": {k: getattr(moe.cfg.moe, k) for k in ("num_experts", "top_k", "expert_hidden",
                                                                "num_shared", "shared_hidden")},
                   "mtp_weight": MTP_WEIGHT, "optimizer": "AdamW(lr=1e-4)", **mode["data"]},
        "platform": {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "python": platform.python_version(), "machine": platform.machine(),
                     "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "params": params,
        "throughput": throughput,
        "masks": masks["impls"],
        "mask_default_impl": masks["default_impl"],
        "documents_per_row": masks["documents_per_row"],
        "max_abs_diff_segments_vs_sdpa": masks["max_abs_diff_segments_vs_sdpa"],
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
