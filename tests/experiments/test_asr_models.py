"""ASR models: attention modules, encoder, the three decoders, cached greedy decoding, LR schedule, metrics."""
import pytest
import torch

from experiments.asr.data import collate
from experiments.asr.decode import greedy_decode, greedy_decode_memory
from experiments.asr.metrics import cut_pair, similarities, sum_similarities
from experiments.asr.models import AudioEncoder, ModelConfig, SoftmaxAttention, build_attention, build_decoder, build_model, sinusoids
from experiments.asr.train import lr_factor, resolve_mask_padding
from linattn_cuda.nn import TaylorAttention

try:
    from linattn_cuda.nn import HybridAttention
except ImportError:  # not in this linattn_cuda yet: the hybrid cases skip
    HybridAttention = None

SMALL = dict(n_mels=80, max_frames=64, width=32, heads=2, mlp=48, max_len=24)
needs_hybrid = pytest.mark.skipif(HybridAttention is None, reason="linattn_cuda.nn.HybridAttention not available")

# decoder cases: (id, ModelConfig fields)
DECODER_CASES = [
    pytest.param(dict(decoder="lstm"), id="lstm"),
    pytest.param(dict(decoder="transformer"), id="transformer"),
    pytest.param(dict(decoder="transformer", softmax_feature_dim=8), id="transformer-qk8"),
    pytest.param(dict(decoder="taylor", feature_dim=8), id="taylor"),
    pytest.param(dict(decoder="taylor", feature_dim=8, cross_attention="softmax"), id="taylor-softmax-cross"),
    pytest.param(dict(decoder="hybrid", feature_dim=8, window=4), id="hybrid", marks=needs_hybrid),
    pytest.param(dict(decoder="hybrid", feature_dim=8, window=4, cross_attention="taylor"), id="hybrid-taylor-cross", marks=needs_hybrid),
]


def test_softmax_attention_is_the_course_formula():
    torch.manual_seed(0)
    attn = SoftmaxAttention(32, 2)
    assert attn.key.bias is None and attn.query.bias is not None
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    q = attn.query(x).view(2, 5, 2, 16).permute(0, 2, 1, 3) * 16 ** -0.25
    k = attn.key(ctx).view(2, 9, 2, 16).permute(0, 2, 3, 1) * 16 ** -0.25
    v = attn.value(ctx).view(2, 9, 2, 16).permute(0, 2, 1, 3)
    ref = attn.out((torch.softmax(q @ k, -1) @ v).permute(0, 2, 1, 3).flatten(2))
    torch.testing.assert_close(attn(x, ctx), ref)
    causal = attn(x, causal=True)
    torch.testing.assert_close(causal[:, :2], attn(x[:, :2], causal=True))  # later tokens invisible


def test_attention_modules_are_interchangeable_and_share_the_logit():
    """Same constructor, same call; with equal weights Taylor's weights are 1 + s + s^2/2 of softmax's logit s."""
    torch.manual_seed(1)
    soft = build_attention("softmax", 32, 2, feature_dim=8)
    taylor = build_attention("taylor", 32, 2, feature_dim=8)
    assert isinstance(taylor, TaylorAttention)
    taylor.load_state_dict(soft.state_dict())
    assert taylor.scale == soft.scale == pytest.approx(8 ** -0.5)
    x = torch.randn(1, 6, 32) * 0.05  # small logits: exp(s) ~ 1 + s + s^2/2
    torch.testing.assert_close(taylor(x, causal=True), soft(x, causal=True), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention"):
        build_attention("linear", 32, 2)


def test_softmax_attention_caches_match_full():
    torch.manual_seed(2)
    attn = SoftmaxAttention(16, 2).double()
    x, ctx = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 11, 16, dtype=torch.float64)
    full, cache = attn(x, causal=True), attn.init_cache(batch_size=2)
    cross_full, cross = attn(x, ctx), attn.init_cache(context=ctx)
    for t in range(7):
        out, cache = attn.step(x[:, t : t + 1], cache)
        torch.testing.assert_close(out, full[:, t : t + 1])
        out, _ = attn.step(x[:, t : t + 1], cross)
        torch.testing.assert_close(out, cross_full[:, t : t + 1])


def test_encoder_shapes_and_positions():
    enc = AudioEncoder(80, 32, 2, 48, 2, max_frames=2754)
    assert enc.positions.shape == (1377, 32)
    assert enc(torch.randn(2, 80, 2754)[:, :, :101]).shape == (2, 51, 32)
    pos = sinusoids(10, 8)
    torch.testing.assert_close(pos[:, :4], torch.sin(torch.arange(10.0)[:, None] * torch.exp(-torch.arange(4.0) * torch.log(torch.tensor(3000.0)) / 3)))


def test_course_sizes():
    """The course's configuration (SPEC section 3): width 200, 2 heads, MLP 400, 2 encoder blocks, 98 positions."""
    for dec in ("lstm", "transformer", "taylor"):
        model = build_model(ModelConfig(decoder=dec))
        assert model.encoder.positions.shape == (1377, 200) and len(model.encoder.blocks) == 2
        assert model.decoder.head.out_features == 35 and model.decoder.embed.weight.shape == (35, 200)
        assert model.decoder.cross.mlp[0].out_features == 400
    lstm = build_model(ModelConfig(decoder="lstm")).decoder.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (200, 200, 1)
    dec = build_model(ModelConfig(decoder="transformer")).decoder
    assert dec.positions.shape == (98, 200) and 0 <= dec.positions.min() and dec.positions.max() < 1
    taylor = build_model(ModelConfig(decoder="taylor")).decoder
    assert isinstance(taylor.self_attn, TaylorAttention) and isinstance(taylor.cross.attn, TaylorAttention)
    assert taylor.self_attn.qk_dim == 16


@pytest.mark.parametrize("decoder", ["lstm", "transformer", "taylor", pytest.param("hybrid", marks=needs_hybrid)])
def test_decoder_forward_backward(decoder):
    torch.manual_seed(3)
    model = build_model(ModelConfig(decoder=decoder, **SMALL))
    feats, tokens = torch.randn(3, 80, 64), torch.randint(0, 35, (3, 25))
    logits = model(feats, tokens[:, :-1])
    assert logits.shape == (3, 24, 35)
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], label_smoothing=0.1).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "decoder,encoder_attention",
    [("lstm", "softmax"), ("transformer", "softmax"), ("taylor", "softmax"), ("taylor", "taylor"),
     pytest.param("hybrid", "softmax", marks=needs_hybrid)],
    ids=["lstm", "transformer", "taylor", "taylor-taylor-encoder", "hybrid"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cached_decoding_equals_uncached(decoder, encoder_attention, dtype):
    torch.manual_seed(4)
    model = build_model(ModelConfig(decoder=decoder, encoder_attention=encoder_attention, **SMALL)).to(dtype).eval()
    with torch.no_grad():  # sharpen the random model so that it does not emit one token forever
        model.decoder.head.weight.mul_(4)
    feats = torch.randn(4, 80, 64, dtype=dtype)
    cached = greedy_decode(model, feats, steps=23, use_cache=True)
    uncached = greedy_decode(model, feats, steps=23, use_cache=False)
    assert cached.shape == (4, 24) and (cached[:, 0] == 0).all()
    assert torch.equal(cached, uncached)
    if decoder != "lstm":  # (a random LSTM decoder settles on one token; its logits are compared below)
        assert len(set(cached[:, 1:].flatten().tolist())) > 3
    # the logits agree too, step by step
    memory = model.encoder(feats)
    cache = model.decoder.init_cache(memory)
    full = model.decoder(cached[:, :-1], memory)
    for t in range(23):
        logits, cache = model.decoder.step(cached[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=1e-4)


def test_greedy_decode_memory_stops_at_max_positions():
    model = build_model(ModelConfig(decoder="transformer", **SMALL)).eval()
    memory = torch.randn(1, 10, 32)
    with pytest.raises(ValueError, match="positions"):
        greedy_decode_memory(model.decoder, memory, steps=25, use_cache=True)


def test_lr_schedule_matches_the_course_schedulers():
    """The course: SequentialLR(LinearLR(0.01 -> 1, 2 epochs), LinearLR(1 -> 0.01, 12 epochs)), per epoch."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    warm = torch.optim.lr_scheduler.LinearLR(opt, 1e-2, 1.0, total_iters=2)
    decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 1e-2, total_iters=12)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[2])
    for epoch in range(15):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(epoch), rel=1e-6), epoch
        opt.step()
        sched.step()


def test_metrics_follow_the_course():
    # target cut after its first '>'; prediction without '>' gets its last token replaced by '>'
    assert cut_pair([0, 9, 10, 1, 2, 2], [0, 9, 11, 12]) == ([0, 9, 10, 1], [0, 9, 11, 1])
    assert cut_pair([0, 9, 1, 2], [0, 9, 1, 9, 1]) == ([0, 9, 1], [0, 9, 1])
    s = similarities([0, 9, 10, 1], [0, 10, 9, 1])
    assert s["jaccard"] == pytest.approx(1.0) and s["cosine"] == pytest.approx(1.0)  # bags of tokens
    assert s["damerau_levenshtein"] == pytest.approx(0.75)  # one transposition in 4
    totals = sum_similarities(torch.tensor([[0, 9, 1], [0, 9, 1]]), torch.tensor([[0, 9, 1], [0, 5, 1]]))
    assert totals["damerau_levenshtein"] == pytest.approx(1 + 2 / 3)


# ------------------------------------------------------------------------------------------ padding masks


def _clips(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(80, n, generator=g) for n in lengths]


def _batch(clips, frames):
    """Right-pad each clip with zeros to ``frames`` (as the dataset does) and stack; lengths as collate gives them."""
    items = [(torch.nn.functional.pad(c, (0, frames - c.shape[1])), torch.zeros(3, dtype=torch.long), i, c.shape[1])
             for i, c in enumerate(clips)]
    feats, _, _, lengths = collate(items)
    return feats, lengths


@pytest.mark.parametrize("encoder_attention", ["softmax", "taylor"])
@pytest.mark.parametrize("fields", DECODER_CASES)
def test_logits_do_not_depend_on_padding(fields, encoder_attention):
    """A clip's logits with ``lengths`` equal those of the clip alone and unpadded (the ground truth), whether its
    batch pads it to 50 or to 64 frames; without ``lengths`` the padding changes them (the test can fail)."""
    torch.manual_seed(6)
    model = build_model(ModelConfig(encoder_attention=encoder_attention, **{**SMALL, **fields})).eval()
    clips = _clips([37, 50, 22, 64])  # odd and even lengths: the strided convolution's last window differs
    tokens = torch.randint(0, 35, (1, 24))
    with torch.no_grad():
        alone = [model(c[None], tokens) for c in clips[:3]]  # no padding at all
        for frames, batch in ((50, clips[:3]), (64, clips)):
            feats, lengths = _batch(batch, frames)
            logits = model(feats, tokens.expand(len(batch), -1), lengths)
            for i in range(3):
                torch.testing.assert_close(logits[i : i + 1], alone[i], atol=2e-5, rtol=1e-4)
        feats, lengths = _batch(clips, 64)
        unmasked = model(feats, tokens.expand(4, -1))
        assert (unmasked[2:3] - alone[2]).abs().max() > 1e-3  # clip 2 (22 of 64 frames) sees its padding unmasked


@pytest.mark.parametrize("encoder_attention", ["softmax", "taylor"])
@pytest.mark.parametrize("fields", DECODER_CASES)
def test_masked_caches_match_the_masked_forward(fields, encoder_attention):
    """init_cache takes the same mask: step-by-step logits equal the masked teacher-forced ones, and greedy tokens
    (cached and re-fed) do not depend on the padding."""
    torch.manual_seed(7)
    model = build_model(ModelConfig(encoder_attention=encoder_attention, **{**SMALL, **fields})).double().eval()
    with torch.no_grad():
        model.decoder.head.weight.mul_(4)
    clips = [c.double() for c in _clips([37, 12, 64], seed=8)]
    feats, lengths = _batch(clips, 64)
    cached = greedy_decode(model, feats, steps=23, use_cache=True, lengths=lengths)
    assert torch.equal(cached, greedy_decode(model, feats, steps=23, use_cache=False, lengths=lengths))
    short, short_lengths = _batch(clips[:2], 37)
    assert torch.equal(cached[:2], greedy_decode(model, short, steps=23, use_cache=True, lengths=short_lengths))
    memory, mask = model.encode(feats, lengths)
    assert mask.tolist()[1] == [False] * 6 + [True] * 26  # 12 frames -> 6 encoder frames of 32
    full = model.decoder(cached[:, :-1], memory, mask)
    cache = model.decoder.init_cache(memory, mask)
    for t in range(23):
        logits, cache = model.decoder.step(cached[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], atol=1e-6, rtol=1e-5)  # (softmax runs in float32)


def test_lengths_are_checked():
    model = build_model(ModelConfig(decoder="taylor", **SMALL)).eval()
    feats = torch.zeros(2, 80, 40)
    for bad, match in ((torch.tensor([10]), "lengths must be a 1-D tensor of 2"), (torch.tensor([10.0, 3.0]), "integers"),
                       (torch.tensor([0, 3]), r"\[1, 40\]"), (torch.tensor([41, 3]), r"\[1, 40\]"), ([3, 4], "lengths")):
        with pytest.raises(ValueError, match=match):
            model(feats, torch.zeros(2, 5, dtype=torch.long), bad)
    with pytest.raises(ValueError, match="memory_mask"):
        greedy_decode_memory(model.decoder, torch.zeros(2, 20, 32), steps=2, memory_mask=torch.zeros(2, 19, dtype=torch.bool))


def test_mask_padding_resolution():
    """auto: on whenever a Taylor (or hybrid) attention is involved, off for the course's softmax models."""
    assert not resolve_mask_padding("auto", ModelConfig(decoder="transformer"))
    assert not resolve_mask_padding("auto", ModelConfig(decoder="lstm"))
    assert resolve_mask_padding("auto", ModelConfig(decoder="taylor"))
    assert resolve_mask_padding("auto", ModelConfig(decoder="hybrid"))
    assert resolve_mask_padding("auto", ModelConfig(decoder="transformer", encoder_attention="taylor"))
    assert resolve_mask_padding("auto", ModelConfig(decoder="lstm", cross_attention="taylor"))
    assert resolve_mask_padding("auto", ModelConfig(decoder="taylor", cross_attention="softmax"))
    assert resolve_mask_padding("on", ModelConfig(decoder="transformer"))
    assert not resolve_mask_padding("off", ModelConfig(decoder="taylor"))
    with pytest.raises(ValueError, match="mask_padding"):
        resolve_mask_padding("yes", ModelConfig())


def test_softmax_feature_dim_ablation_and_attention_choices():
    """softmax_feature_dim gives the softmax decoder Taylor's q/k width; cross_attention switches the cross kind."""
    dec = build_model(ModelConfig(decoder="transformer", softmax_feature_dim=16)).decoder
    assert isinstance(dec.self_attn, SoftmaxAttention) and dec.self_attn.qk_dim == 16 and dec.cross.attn.qk_dim == 16
    assert dec.self_attn.query.out_features == 2 * 16 and dec.self_attn.scale == pytest.approx(16 ** -0.5)
    course = build_model(ModelConfig(decoder="transformer")).decoder
    assert course.self_attn.qk_dim == 100 and course.cross.attn.qk_dim == 100
    mixed = build_model(ModelConfig(decoder="taylor", cross_attention="softmax")).decoder
    assert isinstance(mixed.self_attn, TaylorAttention) and isinstance(mixed.cross.attn, SoftmaxAttention)
    assert mixed.cross.attn.qk_dim == 100  # softmax_feature_dim not given: the head dim
    lstm = build_model(ModelConfig(decoder="lstm", cross_attention="taylor", feature_dim=8)).decoder
    assert isinstance(lstm.cross.attn, TaylorAttention) and lstm.cross.attn.qk_dim == 8
    with pytest.raises(ValueError, match="unknown decoder"):
        build_decoder("gru")
    with pytest.raises(ValueError, match="cross_attention"):
        build_decoder("transformer", cross_attention="linear")
    with pytest.raises(ValueError, match="encoder_attention"):
        build_model(ModelConfig(encoder_attention="hybrid"))


@needs_hybrid
def test_hybrid_decoder_modules():
    dec = build_model(ModelConfig(decoder="hybrid", window=8)).decoder
    assert isinstance(dec.self_attn, HybridAttention) and isinstance(dec.cross.attn, SoftmaxAttention)
    assert dec.cross.attn.qk_dim == 100  # course softmax cross-attention
    dec = build_model(ModelConfig(decoder="hybrid", cross_attention="taylor")).decoder
    assert isinstance(dec.cross.attn, TaylorAttention) and dec.cross.attn.qk_dim == 16
