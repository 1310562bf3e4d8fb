"""ERNIE 3.0 costs, one process, JSON: recurrence memory on vs off, and the NLU path vs a plain encoder.

    python benchmarks/ernie3_memory.py            # small preset, 4 segments of 128 tokens, batch 8
    python benchmarks/ernie3_memory.py --quick    # tiny, for the test

1. Document-LM training step (forward + backward over S segments in order) with the recurrence
   memory on (each segment also attends to mem_len stop-gradient states per layer) vs off, at equal
   segment length: tokens/s (median of per-pair ratios, timed alternately) and the activation memory
   saved for backward (bytes of the tensors autograd keeps, counted once per storage; device
   independent), plus peak CUDA memory on GPU.
2. A knowledge-masked-LM training step through ERNIE 3.0's NLU path (universal module + projection +
   NLU module) vs a plain bidirectional encoder of about the same parameter count (one trunk at the
   universal width with as many layers as fit the NLU path's parameters).
An A/A pair (memory on vs on) gives the noise floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from models.ernie3 import Ernie3, Ernie3Config  # noqa: E402
from models.layers.mask import AttentionMask  # noqa: E402
from models.layers.trunk import Trunk, TrunkConfig  # noqa: E402


def saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while `fn` runs (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    preset, B, S, T, V = ("tiny", 2, 2, 32, 256) if args.quick else ("small", 8, 4, 128, 2048)
    repeats = args.repeats or (2 if args.quick else 8)
    torch.manual_seed(0)
    cfg = Ernie3Config(preset=preset, vocab_size=V, mem_len=T // 2)
    model = Ernie3(cfg).to(device).train()
    docs = torch.randint(0, V, (B, S, T + 1), device=device)

    def dlm_step(use_memory: bool):
        def run():
            memory, total = None, 0.0
            for s in range(S):
                logits, memory = model(docs[:, s, :-1], "lm", memory=memory, use_memory=use_memory)
                loss = F.cross_entropy(logits.float().flatten(0, 1), docs[:, s, 1:].flatten())
                loss.backward()  # per segment: memory is stop-gradient, so segments back-propagate alone
                total += float(loss)
            model.zero_grad(set_to_none=True)
            return total
        return run

    on, off = dlm_step(True), dlm_step(False)
    ta, tb = alternate(on, on, repeats, device)
    aa = statistics.median(a / b for a, b in zip(ta, tb))
    t_on, t_off = alternate(on, off, repeats, device)
    tokens = B * S * T

    def seg_saved(use_memory: bool) -> int:
        _, memory = model(docs[:, 0, :-1], "lm")
        memory = memory if use_memory else None
        return saved_bytes(lambda: model(docs[:, 1, :-1], "lm", memory=memory, use_memory=use_memory)[0].sum())

    peak = {}
    if device.type == "cuda":
        for name, fn in (("on", on), ("off", off)):
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            peak[name] = torch.cuda.max_memory_allocated(device)

    # NLU path vs a plain encoder of about equal size
    nlu_params = sum(p.numel() for m in (model.tok_emb, model.universal, model.proj, model.nlu, model.mlm_head)
                     for p in m.parameters())
    per_layer = sum(p.numel() for p in model.universal.layers[0].parameters())
    base = nlu_params - sum(p.numel() for p in model.universal.layers.parameters()) \
        - sum(p.numel() for m in (model.proj, model.nlu) for p in m.parameters())
    layers = max(1, round((nlu_params - base) / per_layer))
    enc_cfg = TrunkConfig(n_layers=layers, d_model=cfg.d_model, n_heads=cfg.n_heads)
    encoder = torch.nn.ModuleDict({"emb": torch.nn.Embedding(V, cfg.d_model), "trunk": Trunk(enc_cfg),
                                   "head": torch.nn.Linear(cfg.d_model, V, bias=False)}).to(device)
    enc_params = sum(p.numel() for p in encoder.parameters())
    x = torch.randint(0, V, (B, T), device=device)
    target = torch.where(torch.rand(B, T, device=device) < 0.15, x, torch.full_like(x, -100))
    positions = torch.arange(T, device=device)

    def nlu_step():
        loss = F.cross_entropy(model(x, "mlm").float().flatten(0, 1), target.flatten(), ignore_index=-100)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def enc_step():
        h = encoder["trunk"](encoder["emb"](x), positions, AttentionMask.full()).hidden
        loss = F.cross_entropy(encoder["head"](h).float().flatten(0, 1), target.flatten(), ignore_index=-100)
        loss.backward()
        encoder.zero_grad(set_to_none=True)

    t_nlu, t_enc = alternate(nlu_step, enc_step, repeats, device)
    out = {
        "benchmark": "ernie3_memory",
        "config": {"preset": preset, "batch": B, "segments": S, "segment_len": T, "mem_len": cfg.mem_len,
                   "recurrence": cfg.recurrence, "repeats": repeats},
        "dlm": {
            "tokens_per_s_memory_on": round(tokens / statistics.median(t_on), 1),
            "tokens_per_s_memory_off": round(tokens / statistics.median(t_off), 1),
            "time_ratio_on_over_off": round(statistics.median(a / b for a, b in zip(t_on, t_off)), 4),
            "saved_activation_bytes_per_segment_on": seg_saved(True),
            "saved_activation_bytes_per_segment_off": seg_saved(False),
            **({"peak_cuda_bytes_on": peak["on"], "peak_cuda_bytes_off": peak["off"]} if peak else {}),
        },
        "nlu_vs_plain_encoder": {
            "ernie3_nlu_path_params": nlu_params, "plain_encoder_params": enc_params, "plain_encoder_layers": layers,
            "tokens_per_s_ernie3_nlu": round(B * T / statistics.median(t_nlu), 1),
            "tokens_per_s_plain_encoder": round(B * T / statistics.median(t_enc), 1),
            "time_ratio_nlu_over_encoder": round(statistics.median(a / b for a, b in zip(t_nlu, t_enc)), 4),
            "saved_activation_bytes_ernie3_nlu": saved_bytes(lambda: model(x, "mlm").sum()),
            "saved_activation_bytes_plain_encoder": saved_bytes(
                lambda: encoder["head"](encoder["trunk"](encoder["emb"](x), positions, AttentionMask.full()).hidden).sum()),
        },
        "aa_ratio_memory_on_over_on": round(aa, 4),
        "torch": torch.__version__, "device": str(device),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
