"""linattn_cuda.integrations.transformers across model families (tiny models built from configs, no downloads):
logits of a padded forward and of generate() against the same weights with a float64 Taylor / hybrid attention
(tests/transformers_cases.py), an encoder (BERT), and the options each family's config may ask for that the
attention cannot honour. Skipped without transformers."""
import pytest
import torch

transformers = pytest.importorskip("transformers", exc_type=ImportError)

from linattn_cuda.integrations import transformers as la_hf  # noqa: E402

if la_hf.version_tuple(transformers.__version__) < la_hf.version_tuple(la_hf.MIN_TRANSFORMERS):
    pytest.skip(f"transformers {transformers.__version__} is older than {la_hf.MIN_TRANSFORMERS}", allow_module_level=True)

from tests import transformers_cases as cases  # noqa: E402

STATE_CACHE = la_hf.version_tuple(transformers.__version__) >= la_hf.version_tuple(la_hf.MIN_TRANSFORMERS_STATE_CACHE)
# float32 model against the float64 ground truth: the measured error is <= 5e-6 on logits of magnitude ~4
TOL = dict(rtol=2e-5, atol=3e-5)
KINDS = ["taylor", "hybrid"]


@pytest.fixture(scope="module")
def names():
    return cases.register_all()


def padded_forward(model, family, ids, mask, pos):
    kw = dict(attention_mask=mask) if family == "bert" else dict(attention_mask=mask, position_ids=pos)
    return cases.logits_of(model, ids, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", cases.DECODERS + ["bert"])
def test_padded_forward_matches_float64(names, family, kind):
    """A left-padded batch (right-padded for the BERT encoder), grouped-query heads where the family has them:
    the logits of the real tokens equal those of the float64 ground truth with the same weights."""
    ours, reference = names[kind]
    ids, mask, pos, _ = cases.padded_batch([13, 8], "right" if family == "bert" else "left")
    if not cases.family_runs(family):  # an old version: the family's own 4-D mask is refused, not misread (old BERT
        with pytest.raises((ValueError, KeyError)):  # does not even look the attention up: a KeyError of its own)
            padded_forward(cases.build(family, ours), family, ids, mask, pos)
        return
    model = cases.build(family, ours)
    ref = cases.twin(model, reference, torch.float64)
    got = padded_forward(model, family, ids, mask, pos)
    want = padded_forward(ref, family, ids, mask, pos)
    keep = mask.bool()
    torch.testing.assert_close(got[keep].double(), want[keep], **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", cases.DECODERS)
def test_generate_matches_float64_full_forwards(names, family, kind):
    """generate() on a left-padded batch with the default cache (the fixed-size state on transformers >= 5.0):
    the logits of every generated token equal a float64 full forward over the sequence so far."""
    if not cases.family_runs(family):
        pytest.skip(f"{family} builds its own 4-D masks on transformers {transformers.__version__}")
    ours, reference = names[kind]
    model = cases.build(family, ours)
    ref = cases.twin(model, reference, torch.float64)
    ids, mask, _, _ = cases.padded_batch([9, 5], "left", seed=30)
    out, got, want = cases.generate_and_reference_logits(model, ref, ids, mask, new_tokens=6)
    if STATE_CACHE:
        assert type(cases.cache_of(out)).__name__ == "TaylorStateCache"
    torch.testing.assert_close(got.double(), want, **TOL)


def test_the_comparisons_can_fail(names):
    """The tiny models' attention logits are of order 1: Taylor, hybrid (two windows) and softmax attention give
    logits far outside the tolerances above, so a wrong weight, window or mask would be caught."""
    model = cases.build("llama", names["taylor"][1], dtype=torch.float64)
    ids, mask, pos, _ = cases.padded_batch([13, 8], "left")
    keep = mask.bool()
    taylor = cases.logits_of(model, ids, attention_mask=mask, position_ids=pos)[keep]
    others = [cases.twin(model, attn, torch.float64) for attn in (names["hybrid"][1], "sdpa")]
    cases.register_references(cases.WINDOW + 1)
    others.append(cases.twin(model, f"hybrid_f64_w{cases.WINDOW + 1}", torch.float64))
    logits = [cases.logits_of(m, ids, attention_mask=mask, position_ids=pos)[keep] for m in others]
    for a, b in [(taylor, logits[0]), (taylor, logits[1]), (logits[0], logits[2])]:
        assert (a - b).abs().max() > 1000 * TOL["atol"]


@pytest.mark.parametrize("kind", KINDS)
def test_gemma_with_its_head_dim_256(names, kind):
    ours, reference = names[kind]
    model = cases.build("gemma_hd256", ours)
    ref = cases.twin(model, reference, torch.float64)
    ids, mask, pos, _ = cases.padded_batch([7, 4], "left")
    keep = mask.bool()
    got = cases.logits_of(model, ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(got[keep].double(), cases.logits_of(ref, ids, attention_mask=mask, position_ids=pos)[keep], **TOL)
    if STATE_CACHE:
        _, got, want = cases.generate_and_reference_logits(model, ref, ids, mask, new_tokens=3)
        torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_backward_matches_float64(names, kind, layout):
    """Training step with grouped-query heads, of a right-padded batch or of a flattened one (cu_seq_lens; the
    ground truth gets the packing from the position ids): loss and every parameter gradient."""
    ours, reference = names[kind]
    model = cases.build("llama", ours)
    ref = cases.twin(model, reference, torch.float64)
    if layout == "padded":
        ids, mask, pos, _ = cases.padded_batch([12, 7], "right", seed=40)
        labels = ids.masked_fill(mask == 0, -100)
        inputs = want_inputs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    else:
        seqs = [cases.tokens(1, n, seed=41 + i)[0] for i, n in enumerate([9, 3, 11])]
        inputs = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s.tolist()} for s in seqs])
        want_inputs = {k: inputs[k] for k in ("input_ids", "position_ids", "labels")}
    model.train()
    ref.train()
    out = model(**inputs, use_cache=False)
    want = ref(**want_inputs, use_cache=False)
    torch.testing.assert_close(out.loss.double(), want.loss.double(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    want.loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-3, atol=2e-5, msg=name)


# ---- refusals: each names the config field --------------------------------------------------------------------

def test_gemma2_soft_capping_and_sliding_window_are_refused(names):
    ids = cases.tokens(1, 6)
    model = cases.build("gemma2", "taylor")  # as configured by default: soft-capping 50, sliding layers
    with pytest.raises(NotImplementedError, match=r"soft-capping .*config\.attn_logit_softcapping=50\.0"):
        cases.logits_of(model, ids)
    model = cases.build("gemma2", "taylor", attn_logit_softcapping=None)
    with pytest.raises(NotImplementedError, match=r"sliding-window .*config\.sliding_window="):
        cases.logits_of(model, ids)
    model = cases.build("gemma2", "taylor", attn_logit_softcapping=None, layer_types=["full_attention"] * 2)
    assert torch.isfinite(cases.logits_of(model, ids)).all()  # without both it runs


def test_mistral_sliding_window_is_refused(names):
    model = cases.build("mistral", "taylor_hybrid", sliding_window=16)
    with pytest.raises(NotImplementedError, match=r"sliding-window .*config\.sliding_window=16"):
        cases.logits_of(model, cases.tokens(1, 6))


@pytest.mark.parametrize("family,field", [("llama", "attention_dropout"), ("gpt2", "attn_pdrop"),
                                          ("bert", "attention_probs_dropout_prob")])
def test_attention_dropout_is_refused_in_training(names, family, field):
    if not cases.family_runs(family):
        pytest.skip(f"{family} builds its own 4-D masks on transformers {transformers.__version__}")
    model = cases.build(family, "taylor", **{field: 0.1})
    ids = cases.tokens(2, 6)
    assert torch.isfinite(cases.logits_of(model, ids)).all()  # eval: no dropout asked
    model.train()
    with pytest.raises(NotImplementedError, match=rf"no attention dropout; got dropout=0\.1 \(.*config\.{field}=0\.1"):
        model(ids, use_cache=False)


def test_attention_sinks_are_refused(names):
    """gpt-oss passes its learned sinks as ``s_aux``."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no gpt-oss")
    config = transformers.GptOssConfig(
        vocab_size=cases.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, layer_types=["full_attention"],
        pad_token_id=cases.PAD, eos_token_id=cases.EOS, bos_token_id=cases.BOS,
    )
    model = cases.build(config, "taylor")
    with pytest.raises(NotImplementedError, match=r"no learned attention sinks \(s_aux given by GptOssAttention"):
        cases.logits_of(model, cases.tokens(1, 5))
