"""ASR models: attention modules, encoder, the three decoders, cached greedy decoding, LR schedule, metrics."""
import pytest
import torch

from experiments.asr.decode import greedy_decode, greedy_decode_memory
from experiments.asr.metrics import cut_pair, similarities, sum_similarities
from experiments.asr.models import AudioEncoder, ModelConfig, SoftmaxAttention, build_attention, build_model, sinusoids
from experiments.asr.train import lr_factor
from linattn_cuda.nn import TaylorAttention

SMALL = dict(n_mels=80, max_frames=64, width=32, heads=2, mlp=48, max_len=24)


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


@pytest.mark.parametrize("decoder", ["lstm", "transformer", "taylor"])
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
    [("lstm", "softmax"), ("transformer", "softmax"), ("taylor", "softmax"), ("taylor", "taylor")],
    ids=["lstm", "transformer", "taylor", "taylor-taylor-encoder"],
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
