"""ERNIE 5.0's network: sequence layouts, masks and Uni-RoPE against hand-built examples, the additive
audio embedding, MTP / NCP targets and layers, modality-agnostic routing, and KV-cached generation."""

import dataclasses

import pytest
import torch

from models.ernie5 import IGNORE, KINDS, DocumentBuilder, Ernie5, Ernie5Config, UnifiedBatch, VisualSpans, AudioSpans
from models.ernie5 import merge_patches
from models.layers.elastic import RoutingLimit
from models.layers.mask import AttentionMask
from models.moe.replay import RouteReplay
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer
from models.videoar import teacher_forcing_sequence

SCALES = [(1, 1), (2, 2)]
TXT, VU, VG, AU = KINDS["text"], KINDS["vis_und"], KINDS["vis_gen"], KINDS["audio"]
BOI, EOI, SEP, EOS = 90, 91, 96, 1


def allowed_from_blocks(blocks):
    """The obviously correct mask of a block layout: key k visible to query q iff block[k] <= block[q]."""
    b = torch.as_tensor(blocks)
    return b[None, :] <= b[:, None]


def test_image_generation_layout_blocks_and_center_aligned_positions():
    d = DocumentBuilder(1, 2, SCALES).text([5, 6, BOI]).generation(1).text([EOI, EOS]).finish()
    assert d["kind"].tolist() == [TXT] * 3 + [VG] * 5 + [TXT] * 2
    # text 0 1 2 (own blocks), scale 1 one block, scale 2 one block of 4, then EOI, EOS
    assert d["block_ids"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 5, 6]
    pos = d["positions"]
    assert pos[:3].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    # scale 1 (1x1) sits at the centre of the final 2x2 grid: (0 + 0.5) * 2 / 1 - 0.5 = 0.5
    assert pos[3].tolist() == [3, 3.5, 3.5]
    assert pos[4:8].tolist() == [[3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4]]
    # the index after the span is 1 + its largest coordinate (4)
    assert pos[8:].tolist() == [[5, 5, 5], [6, 6, 6]]
    # next-token targets only between text tokens; the BOI token predicts nothing (a visual block follows)
    assert d["text_targets"].tolist() == [6, BOI] + [IGNORE] * 6 + [EOS, IGNORE]
    assert d["mtp_targets"].tolist() == [BOI] + [IGNORE] * 9


def test_video_generation_blocks_per_frame_and_scale_and_uni_rope():
    d = DocumentBuilder(2, 4, SCALES).text([7]).generation(2).finish()
    blocks = d["block_ids"].tolist()
    assert blocks == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4]
    pos = d["positions"]
    assert pos[1].tolist() == [1, 1.5, 1.5] and pos[6].tolist() == [2, 1.5, 1.5]  # frame t -> t = p + t
    assert pos[7:11, 0].tolist() == [2, 2, 2, 2]
    mask = AttentionMask.blocks(d["block_ids"][None]).dense(11, 11)[0, 0]
    assert torch.equal(mask, allowed_from_blocks(blocks))
    # frame 2's first scale sees all of frame 1 and not its own finer scale
    assert mask[6, :6].all() and not mask[6, 7:].any()


def test_understanding_span_is_one_bidirectional_block_with_merged_positions():
    d = DocumentBuilder(1, 1, [(1, 1), (2, 2), (4, 4)]).text([BOI]).understanding(1).text([EOI, SEP, 8, EOS]).finish()
    assert d["kind"].tolist() == [TXT] + [VU] * 4 + [TXT] * 4
    assert d["block_ids"].tolist() == [0, 1, 1, 1, 1, 2, 3, 4, 5]
    # 2x2 cells of the 4x4 latent grid, centred: h = p + 2 i + 0.5
    assert d["positions"][1:5].tolist() == [[1, 1.5, 1.5], [1, 1.5, 3.5], [1, 3.5, 1.5], [1, 3.5, 3.5]]
    assert d["positions"][5].tolist() == [5, 5, 5]
    mask = AttentionMask.blocks(d["block_ids"][None]).dense(9, 9)[0, 0]
    assert mask[1, 4] and mask[4, 1]  # bidirectional inside the image
    assert not mask[0, 1] and mask[8, 1]  # causal around it
    assert d["text_targets"].tolist() == [IGNORE] * 5 + [SEP, 8, EOS, IGNORE]
    assert d["mtp_targets"].tolist() == [IGNORE] * 5 + [8, EOS, IGNORE, IGNORE]


def test_audio_span_is_causal_with_sequential_positions():
    d = DocumentBuilder(3, 6, SCALES).text([4, 92]).audio(3).text([93, EOS]).finish()
    assert d["kind"].tolist() == [TXT, TXT, AU, AU, AU, TXT, TXT]
    assert d["block_ids"].tolist() == list(range(7))
    assert d["positions"][:, 0].tolist() == list(range(7)) and (d["positions"][:, 1] == d["positions"][:, 0]).all()
    assert d["spans"] == [("audio", 2, 3)]


def test_merge_patches_orders_2x2_cells_row_major():
    lat = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).view(1, 2, 1, 4, 4)  # [n, T', D, H, W]
    p = merge_patches(lat)
    assert p.shape == (1, 8, 4, 1)
    assert p[0, 0, :, 0].tolist() == [0, 1, 4, 5] and p[0, 1, :, 0].tolist() == [2, 3, 6, 7]
    assert p[0, 4, :, 0].tolist() == [16, 17, 20, 21]  # second latent frame


# ----------------------------------------------------------------------------------------- network


def tiny_cfg(**kw):
    base = dict(text_vocab=100, bits=8, scales=[[1, 1], [2, 2], [4, 4]], audio_levels=2, audio_codebook=16,
                n_layers=3)
    return Ernie5Config(**{**base, **kw})


def pack_rows(rows, S, on_span):
    """Stack rows of DocumentBuilders into UnifiedBatch fields (documents back to back, then padding);
    on_span(row, doc start, kind, first, count) is called for every media span."""
    fields = {k: [] for k in ("ids", "kind", "modality", "task", "positions", "block_ids", "doc_ids", "text_targets",
                              "mtp_targets")}
    for r, docs in enumerate(rows):
        parts = {k: [] for k in fields}
        used = block = 0
        for i, b in enumerate(docs):
            d = b.finish()
            n = len(d["ids"])
            for k in ("ids", "kind", "positions", "text_targets", "mtp_targets", "task", "modality"):
                parts[k].append(d[k])
            parts["block_ids"].append(d["block_ids"] + block)
            parts["doc_ids"].append(torch.full((n,), i))
            for kind, first, count in d["spans"]:
                on_span(r, used, kind, first, count)
            block += int(d["block_ids"].max()) + 1
            used += n
        pad = S - used
        for k, fill in (("ids", 0), ("kind", -1), ("text_targets", IGNORE), ("mtp_targets", IGNORE), ("task", -1),
                        ("modality", -1)):
            parts[k].append(torch.full((pad,), fill))
        parts["positions"].append(torch.zeros(pad, 3))
        parts["block_ids"].append(block + torch.arange(pad))
        parts["doc_ids"].append(torch.full((pad,), len(docs)))
        for k in fields:
            fields[k].append(torch.cat(parts[k]).to(torch.float if k == "positions" else torch.long))
    return {k: torch.stack(v) for k, v in fields.items()}


def tiny_batch(seed=0):
    """Two packed rows: row 0 = image generation doc + text doc; row 1 = audio generation doc + image
    understanding doc (hand-built with DocumentBuilder, spans at known places)."""
    g = torch.Generator().manual_seed(seed)
    S = 40
    scales = [(1, 1), (2, 2), (4, 4)]
    rows = [[DocumentBuilder(1, 2, scales).text([5, 6, BOI]).generation(1).text([EOI, EOS]),
             DocumentBuilder(0, 0, scales).text([11, 12, 13, 14, EOS])],
            [DocumentBuilder(3, 6, scales).text([7, 8, 92]).audio(5).text([93, EOS]),
             DocumentBuilder(1, 1, scales).text([BOI]).understanding(1).text([EOI, SEP, 9, 10, EOS])]]
    vis_gen, vis_und, audio = [], [], []

    def on_span(r, start, kind, first, count):
        dest = r * S + start + first + torch.arange(count)
        if kind == "vis_gen":
            vis_gen.append(VisualSpans("image_gen", torch.randn(1, 1, 8, 4, 4, generator=g), dest[None]))
        elif kind == "vis_und":
            vis_und.append(VisualSpans("image_und", torch.randn(1, 1, 8, 4, 4, generator=g), dest[None]))
        else:
            audio.append(AudioSpans("audio_gen", torch.randint(16, (1, count, 2), generator=g), dest[None]))

    fields = pack_rows(rows, S, on_span)
    return UnifiedBatch(**fields, vis_und=vis_und, vis_gen=vis_gen, audio=audio)


@pytest.fixture(scope="module")
def quantizer():
    torch.manual_seed(0)
    return VisualTokenizer(TokenizerConfig(preset="tiny")).quantizer


def vis_inputs(batch, quantizer):
    return [teacher_forcing_sequence(quantizer, s.latents)["inputs"] for s in batch.vis_gen]


def test_additive_audio_embedding_sums_one_table_per_level(quantizer):
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg())
    codes = torch.tensor([[3, 7], [0, 15]])
    want = net.audio_emb[0].weight[[3, 0]] + net.audio_emb[1].weight[[7, 15]]
    assert torch.allclose(net.audio_embed(codes), want)
    batch = tiny_batch()
    x = net.embed(batch, vis_inputs(batch, quantizer))
    a = batch.audio[0]
    assert torch.allclose(x.reshape(-1, x.shape[-1])[a.dest[0]], net.audio_embed(a.codes[0]))


def test_forward_selects_targets_and_ncp_heads_read_layers_L_minus_Q_plus_j(quantizer):
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg()).eval()
    assert net.audio_layers == [1, 2]
    batch = tiny_batch()
    vin = vis_inputs(batch, quantizer)
    out = net(batch, vin)
    tt = batch.text_targets.reshape(-1)
    assert torch.equal(out.text_targets, tt[tt != IGNORE])
    # reference: run the trunk once, read every layer's raw output, apply level j's head by hand
    x = net.embed(batch, vin)
    ref = net.trunk(x, batch.positions, batch.mask(), return_hidden=[0, 1, 2])
    a = batch.audio[0]
    src = (a.dest - 1).reshape(-1)
    C = x.shape[-1]
    h0 = ref.hidden_states[1].reshape(-1, C)[src]
    want0 = net.audio_head[0](net.audio_norm[0](h0))
    h1 = ref.hidden_states[2].reshape(-1, C)[src] + net.audio_emb[0](a.codes[0, :, 0])
    want1 = net.audio_head[1](net.audio_norm[1](h1))
    got0, got1 = out.audio["audio_gen"][0]
    assert torch.allclose(got0[0], want0, atol=1e-5) and torch.allclose(got1[0], want1, atol=1e-5)
    # the first frame is predicted at the BOA token
    assert int(a.dest[0, 0] - 1) == 40 + 2 and int(batch.ids[1, 2]) == 92


def test_depth_sub_model_equals_the_same_layers_exported_and_reads_audio_from_its_last_layers(quantizer):
    """Elastic depth: running layers [0, 2, 3] of a 4-layer net gives every output of a 3-layer net
    holding copies of exactly those layers (the exported sub-model): text, MTP, visual bits and the
    audio levels, which read the sub-model's own last Q layers (2 and 3 of the parent)."""
    torch.manual_seed(0)
    parent = Ernie5(tiny_cfg(n_layers=4)).eval()
    child = Ernie5(tiny_cfg(n_layers=3)).eval()
    keep = [0, 2, 3]
    state = {}
    for key, value in parent.state_dict().items():
        if key.startswith("trunk.layers."):
            i = int(key.split(".")[2])
            if i not in keep:
                continue
            key = key.replace(f"trunk.layers.{i}.", f"trunk.layers.{keep.index(i)}.", 1)
        state[key] = value
    child.load_state_dict(state)
    assert parent.audio_layers_of(keep) == [2, 3] and child.audio_layers == [1, 2]
    batch = tiny_batch()
    vin = vis_inputs(batch, quantizer)
    sub, ref = parent(batch, vin, layers=keep), child(batch, vin)
    assert torch.allclose(sub.text_logits, ref.text_logits, atol=1e-5)
    assert torch.allclose(sub.mtp_logits, ref.mtp_logits, atol=1e-5)
    assert torch.allclose(sub.vis["image_gen"], ref.vis["image_gen"], atol=1e-5)
    for a, b in zip(sub.audio["audio_gen"][0], ref.audio["audio_gen"][0]):
        assert torch.allclose(a, b, atol=1e-5)
    # the full parent reads 2 and 3 as well, but through layer 1: a different prediction
    assert not torch.allclose(parent(batch, vin).audio["audio_gen"][0][0], ref.audio["audio_gen"][0][0], atol=1e-3)
    with pytest.raises(ValueError, match="audio code levels read the last 2 layers"):
        parent(batch, vin, layers=[3])


def test_mtp_targets_are_two_ahead_and_never_cross_documents():
    batch = tiny_batch()
    ids, doc, kind = batch.ids, batch.doc_ids, batch.kind
    for r in range(2):
        for i, t in enumerate(batch.mtp_targets[r].tolist()):
            if t == IGNORE:
                continue
            assert t == int(ids[r, i + 2]) and doc[r, i] == doc[r, i + 2] and (kind[r, i:i + 3] == TXT).all()
    # row 0: doc 0 ends with EOI EOS, doc 1 starts at 11: no target crosses from EOI to doc 1
    row = batch.mtp_targets[0].tolist()
    assert row[:2] == [BOI, IGNORE] and 11 not in row[:10]


def test_routing_never_reads_modality_or_task_ids(quantizer):
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg()).eval()
    batch = tiny_batch()
    vin = vis_inputs(batch, quantizer)

    def routes(b):
        rec = RouteReplay("record")
        out = net(b, vin, routing=RoutingLimit(replay=rec))
        return {k: torch.cat(v) for k, v in rec.recorded.items()}, out.hidden

    r1, h1 = routes(batch)
    g = torch.Generator().manual_seed(5)
    scrambled = dataclasses.replace(batch, modality=torch.randint(4, batch.modality.shape, generator=g),
                                    task=torch.randint(7, batch.task.shape, generator=g))
    r2, h2 = routes(scrambled)
    assert r1.keys() == r2.keys() == {0, 1, 2}
    assert all(torch.equal(r1[k], r2[k]) for k in r1) and torch.equal(h1, h2)


def test_ultra_sparse_defaults_every_layer_moe_with_bias_balancing():
    cfg = Ernie5Config(preset="small", text_vocab=10, bits=16, scales=[[1, 1], [8, 8]], audio_levels=4,
                       audio_codebook=256)
    assert cfg.moe.num_experts == 64 and cfg.moe.top_k == 4 and cfg.moe.num_shared == 1
    assert cfg.moe.bias_balancing and cfg.moe.bias_update_rate == 1e-4 and cfg.moe.capacity_factor is None
    assert cfg.moe.aux_loss_coef == 0 and cfg.ffn == "moe"
    net = Ernie5(cfg)
    assert all(type(b.ffn).__name__ == "MoEFFN" for b in net.trunk.layers)
    routed = cfg.moe.top_k / cfg.moe.num_experts
    assert routed == 0.0625
    with pytest.raises(ValueError, match="model.net.moe"):
        Ernie5Config(text_vocab=10, bits=8, scales=[[1, 1]], audio_levels=1, audio_codebook=4, moe={"top_k": 0})
    with pytest.raises(ValueError, match="audio code levels"):
        Ernie5Config(text_vocab=10, bits=8, scales=[[1, 1]], audio_levels=3, audio_codebook=4)


# -------------------------------------------------------------------------------------- generation


def gen(seed=3):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_generation_deterministic_and_kv_cache_equals_uncached(temperature):
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg()).eval()
    prompt = [("text", [BOI]), ("vis_und", torch.randn(1, 8, 4, 4)), ("text", [EOI, SEP])]
    a = net.generate_text(prompt, 10, temperature=temperature, generator=gen())
    assert a == net.generate_text(prompt, 10, temperature=temperature, generator=gen())
    assert a == net.generate_text(prompt, 10, temperature=temperature, generator=gen(), use_cache=False)


def test_visual_generation_with_guidance_kv_cache_equals_uncached(quantizer):
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg()).eval()
    kw = dict(uncond_prompt=[("text", [BOI])], guidance=3.0)
    a = net.generate_visual(quantizer, [("text", [4, 5, BOI])], 2, generator=gen(), **kw)
    b = net.generate_visual(quantizer, [("text", [4, 5, BOI])], 2, generator=gen(), use_cache=False, **kw)
    c = net.generate_visual(quantizer, [("text", [4, 5, BOI])], 2, generator=gen(), **kw)
    assert [t.shape for t in a] == [(1, 2, 1, 1, 8), (1, 2, 2, 2, 8), (1, 2, 4, 4, 8)]
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    d = net.generate_visual(quantizer, [("text", [4, 5, BOI])], 2, generator=gen(4), **kw)
    assert not all(torch.equal(x, y) for x, y in zip(a, d))
    with pytest.raises(ValueError, match="unconditional prompt"):
        net.generate_visual(quantizer, [("text", [BOI])], 1, guidance=2.0)


def test_audio_generation_kv_cache_equals_uncached():
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg()).eval()
    a = net.generate_audio([("text", [7, 8, 92])], 6, generator=gen())
    b = net.generate_audio([("text", [7, 8, 92])], 6, generator=gen(), use_cache=False)
    assert a.shape == (1, 6, 2) and torch.equal(a, b)


# ------------------------------------------------------------- Random Frame Mask / temporal window

FRAME_SCALES = [[1, 1], [2, 2], [4, 4]]
PER_FRAME = 1 + 4 + 16


def video_batch(seed=0, frames=3, S=160):
    """Two packed rows with three 3-frame video-generation documents (two in row 0, after one another,
    one in row 1 after a text document). Returns (batch, {global frame id: (row, first token)})."""
    g = torch.Generator().manual_seed(seed)
    spec = [[("video", [5, 6, 92]), ("video", [7, 92])], [("text", [11, 12, 13, EOS]), ("video", [8, 9, 10, 92])]]
    rows = [[DocumentBuilder(2, 4, FRAME_SCALES).text(prefix).generation(frames).text([93, EOS]) if kind == "video"
             else DocumentBuilder(0, 0, FRAME_SCALES).text(prefix) for kind, prefix in docs] for docs in spec]
    dests, where = [], {}

    def on_span(r, start, kind, first, count):
        dests.append(r * S + start + first + torch.arange(count))
        for t in range(frames):
            where[len(where)] = (r, start + first + t * PER_FRAME)

    fields = pack_rows(rows, S, on_span)
    spans = VisualSpans("video_gen", torch.randn(len(dests), frames, 8, 4, 4, generator=g), torch.stack(dests))
    return UnifiedBatch(**fields, vis_gen=[spans]), where


def test_frame_ids_number_every_videos_frames_apart_and_the_frame_mask_matches_a_loop_reference():
    batch, where = video_batch()
    fids, F = batch.frame_ids()
    assert F == 9 and fids.shape == (2, 160)
    for f, (r, first) in where.items():
        assert (fids[r, first:first + PER_FRAME] == f).all()
    assert int((fids >= 0).sum()) == 9 * PER_FRAME and (fids[batch.kind != VG] == -1).all()
    keep = torch.rand(2, F, F, generator=gen(0)) >= 0.5
    S, w = 160, 1
    mask = batch.mask(keep, w)
    got = mask.dense(S, S)[:, 0]
    # the obviously correct rule, pair by pair, from the layout's own arrays
    ref = torch.zeros(2, S, S, dtype=torch.bool)
    blk, doc, fr = batch.block_ids.tolist(), batch.doc_ids.tolist(), fids.tolist()
    for b in range(2):
        for q in range(S):
            for k in range(S):
                ok = blk[b][k] <= blk[b][q] and doc[b][k] == doc[b][q]
                tq, tk = fr[b][q], fr[b][k]
                if ok and tq >= 0 and 0 <= tk < tq:
                    ok = tk >= tq - w and bool(keep[b, tq, tk])
                ref[b, q, k] = ok
    assert torch.equal(got, ref)
    assert (got != batch.mask().dense(S, S)[:, 0]).any()  # the rule hides something here
    # FlexAttention's mask_mod (the CUDA path) agrees, evaluated on the whole grid
    mod = mask.mask_mod(S, S, 0, "cpu")
    for b in range(2):
        grid = mod(torch.tensor(b), torch.tensor(0), torch.arange(S)[:, None], torch.arange(S)[None, :])
        assert torch.equal(grid, ref[b])


def test_random_frame_mask_hides_only_earlier_frames_of_the_same_video(quantizer):
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg(scales=FRAME_SCALES)).eval()
    batch, where = video_batch()
    vin = vis_inputs(batch, quantizer)
    _, F = batch.frame_ids()
    with torch.no_grad():
        base = net(batch, vin)
        same = net(batch, vin, frame_keep=torch.ones(2, F, F, dtype=torch.bool), frame_window=2)
        hidden = net(batch, vin, frame_keep=torch.zeros(2, F, F, dtype=torch.bool))
    v0, v1, v2 = (o.vis["video_gen"] for o in (base, same, hidden))
    # every earlier frame kept, window wide enough: nothing hidden (a dense mask instead of unmasked runs)
    assert torch.allclose(v0, v1, atol=1e-5)
    # text before a video (and a text document) is untouched; text after a video reads changed frames
    for r, n in ((0, 3), (1, 4 + 4)):
        assert torch.allclose(base.hidden[r, :n], hidden.hidden[r, :n], atol=1e-5)
    first = slice(0, PER_FRAME)
    assert torch.allclose(v2[:, first], v0[:, first], atol=1e-6)  # frame 0 has no earlier frame
    assert not torch.allclose(v2[:, PER_FRAME:], v0[:, PER_FRAME:])  # later frames lost their history


def test_windowed_video_generation_kv_cache_equals_uncached(quantizer):
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg()).eval()
    prompt = [("text", [4, 5, BOI])]
    kw = dict(uncond_prompt=[("text", [BOI])], guidance=2.0)
    a = net.generate_visual(quantizer, prompt, 3, generator=gen(), frame_window=1, **kw)
    b = net.generate_visual(quantizer, prompt, 3, generator=gen(), frame_window=1, use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    full = net.generate_visual(quantizer, prompt, 3, generator=gen(), **kw)
    wide = net.generate_visual(quantizer, prompt, 3, generator=gen(), frame_window=2, **kw)
    assert all(torch.equal(x, y) for x, y in zip(full, wide))  # a window of 2 hides nothing in 3 frames
    assert all(torch.equal(x[:, :2], y[:, :2]) for x, y in zip(a, full))  # frames 0-1 are within the window
    assert not all(torch.equal(x, y) for x, y in zip(a, full))  # frame 2 no longer sees frame 0
    with pytest.raises(ValueError, match="frame_window must be >= 1"):
        net.generate_visual(quantizer, prompt, 2, frame_window=0)


# ---------------------------------------------------------------------- the patch merger's ViT branch


def vit_cfg(**kw):
    return tiny_cfg(vit_layers=1, vit_dim=16, vit_heads=2, pixel_patch=4, time_stride=2, **kw)


def with_pixels(batch, seed=0):
    """tiny_batch with the understanding span's frames attached (uint8 [n, 1, 16, 16, 3])."""
    g = torch.Generator().manual_seed(seed)
    und = [VisualSpans(s.task, s.latents, s.dest, torch.randint(0, 256, (1, 1, 16, 16, 3), generator=g, dtype=torch.uint8))
           for s in batch.vis_und]
    return UnifiedBatch(**{k: getattr(batch, k) for k in ("ids", "kind", "modality", "task", "positions", "block_ids",
                                                          "doc_ids", "text_targets", "mtp_targets")},
                        vis_und=und, vis_gen=batch.vis_gen, audio=batch.audio)


def test_vit_branch_reads_pixels_inside_its_document_only(quantizer):
    torch.manual_seed(0)
    net = Ernie5(vit_cfg()).eval()
    assert net.vit is not None and net.merger.slot.shape[0] == 8  # 2K slots: 4 CNN + 4 ViT patches
    batch = with_pixels(tiny_batch())
    vi = vis_inputs(batch, quantizer)
    with torch.no_grad():
        a = net(batch, vi).hidden
        b = net(with_pixels(tiny_batch(), seed=1), vi).hidden
    und = batch.vis_und[0].dest[0]
    first = int(und[0]) - 40  # row 1; the understanding document starts one token (BOI) before its span
    doc = batch.doc_ids[1]
    same_doc = (doc == doc[first]).nonzero().squeeze(-1)
    changed = (a[1] - b[1]).abs().amax(-1) > 1e-6
    assert changed[same_doc[same_doc >= first]].all()  # the span and everything after it in the document
    assert not changed[same_doc[same_doc < first - 1]].any() and not changed[doc != doc[first]].any()
    assert (a[0] - b[0]).abs().max() < 1e-5  # the other row (equal up to the float order of the batched expert GEMMs)
    # without pixels the branch cannot run, and says which knob needs them
    with pytest.raises(ValueError, match="vit_layers"):
        net(tiny_batch(), vi)
    # a CNN-only network ignores pixels
    torch.manual_seed(0)
    plain = Ernie5(tiny_cfg()).eval()
    with torch.no_grad():
        assert torch.equal(plain(batch, vi).hidden, plain(tiny_batch(), vi).hidden)


def test_vit_tubelets_read_their_own_frames_and_frame_zero_stands_alone():
    torch.manual_seed(0)
    vit = Ernie5(vit_cfg()).vit.eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 5, 16, 16, 3), generator=g, dtype=torch.uint8)  # 5 frames -> 3 latent frames
    with torch.no_grad():
        base = vit(pixels, 3)
        assert base.shape == (2, 3, 16, 4, 4)
        for frame, tubelet in ((0, 0), (1, 1), (2, 1), (3, 2), (4, 2)):  # frame 0 alone, then 2 frames each
            p = pixels.clone()
            p[:, frame] = 255 - p[:, frame]
            out = vit(p, 3)
            for t in range(3):
                assert torch.equal(out[:, t], base[:, t]) == (t != tubelet), (frame, t)
        # an image is a 1-frame video: its tubelet is frame 0 alone
        assert torch.allclose(vit(pixels[:, :1], 1)[:, 0], base[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="latent frames"):
        vit(pixels[:, :4], 3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_captioning_with_the_vit_branch_kv_cache_equals_uncached(temperature):
    torch.manual_seed(0)
    net = Ernie5(vit_cfg()).eval()
    pix = torch.randint(0, 256, (1, 16, 16, 3), generator=gen(), dtype=torch.uint8)
    prompt = [("text", [BOI]), ("vis_und", (torch.randn(1, 8, 4, 4), pix)), ("text", [EOI, SEP])]
    a = net.generate_text(prompt, 10, temperature=temperature, generator=gen())
    assert a == net.generate_text(prompt, 10, temperature=temperature, generator=gen(), use_cache=False)
    other = [prompt[0], ("vis_und", (prompt[1][1][0], 255 - pix)), prompt[2]]
    with torch.no_grad():
        assert not torch.allclose(net.embed_document(other)[0], net.embed_document(prompt)[0])
    with pytest.raises(ValueError, match="vit_layers"):
        net.generate_text([prompt[0], ("vis_und", prompt[1][1][0]), prompt[2]], 2)


# ------------------------------------------------------------------------------ TTS speaker token


def speaker_batch(ref: torch.Tensor, codes: torch.Tensor):
    """One row: an audio generation document opened by a speaker token (reference codes `ref`), then a
    text document; returns the batch and the speaker token's and audio span's flat indices."""
    S = 20
    rows = [[DocumentBuilder(3, 6, SCALES).speaker().text([7, 8, 92]).audio(codes.shape[0]).text([93, EOS]),
             DocumentBuilder(0, 0, SCALES).text([11, 12, EOS])]]
    spk, aud = [], []

    def on_span(r, start, kind, first, count):
        dest = r * S + start + first + torch.arange(count)
        (spk if kind == "speaker" else aud).append(dest)

    fields = pack_rows(rows, S, on_span)
    batch = UnifiedBatch(**fields, audio=[AudioSpans("audio_gen", codes[None], aud[0][None])],
                         speakers=[AudioSpans("audio_gen", ref[None], spk[0][None])])
    return batch, spk[0], aud[0]


def test_speaker_token_layout_and_its_embedding_from_the_reference_clip():
    d = DocumentBuilder(3, 6, SCALES).speaker().text([7, 8, 92]).audio(3).text([93, EOS]).finish()
    SPK = KINDS["speaker"]
    assert d["kind"].tolist() == [SPK] + [TXT] * 3 + [AU] * 3 + [TXT] * 2
    assert d["positions"][:, 0].tolist() == list(range(9)) and d["block_ids"].tolist() == list(range(9))  # causal
    assert d["spans"] == [("speaker", 0, 1), ("audio", 4, 3)]
    assert int(d["text_targets"][0]) == IGNORE  # the speaker token predicts no text
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg(speaker=True))
    g = torch.Generator().manual_seed(1)
    ref, ref2, codes = (torch.randint(16, (n, 2), generator=g) for n in (6, 6, 4))
    batch, spk, aud = speaker_batch(ref, codes)
    x = net.embed(batch, []).reshape(-1, net.cfg.d_model)
    # the speaker vector: an MLP over the mean of the reference's additive code embeddings
    want = net.speaker_enc(torch.stack([net.audio_emb[0].weight[ref[f, 0]] + net.audio_emb[1].weight[ref[f, 1]]
                                        for f in range(6)]).mean(0))
    assert torch.allclose(x[spk[0]], want, atol=1e-6)
    assert torch.allclose(x[aud], net.audio_embed(codes), atol=1e-6)
    # it conditions the audio that follows (and only what follows: the text document is untouched)
    out = net(batch, [])
    other = net(speaker_batch(ref2, codes)[0], [])
    assert not torch.allclose(out.audio["audio_gen"][0][0], other.audio["audio_gen"][0][0])
    assert torch.allclose(out.text_logits[-2:], other.text_logits[-2:], atol=1e-5)
    # the reference's frame order does not matter (a clip-level voice summary)
    same = net(speaker_batch(ref.flip(0), codes)[0], [])
    assert torch.allclose(out.audio["audio_gen"][0][0], same.audio["audio_gen"][0][0], atol=1e-5)
    # speaker tokens need a network built with the speaker embedding
    with pytest.raises(ValueError, match="model.net.speaker=false"):
        Ernie5(tiny_cfg()).embed(batch, [])


def test_audio_generation_with_a_speaker_reference_kv_cache_equals_uncached():
    torch.manual_seed(0)
    net = Ernie5(tiny_cfg(speaker=True)).eval()
    g = torch.Generator().manual_seed(1)
    ref, ref2 = torch.randint(16, (6, 2), generator=g), torch.randint(16, (6, 2), generator=g)
    prompt = [("speaker", ref), ("text", [7, 8, 92])]
    a = net.generate_audio(prompt, 6, generator=gen())
    b = net.generate_audio(prompt, 6, generator=gen(), use_cache=False)
    c = net.generate_audio([("speaker", ref2), ("text", [7, 8, 92])], 6, generator=gen())
    assert a.shape == (1, 6, 2) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, net.generate_audio(prompt, 6, generator=gen()))  # deterministic under the generator
