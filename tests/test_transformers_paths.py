"""Every input path of the transformers attention (tiny Llama/GPT-2 models, no downloads): padding on either side,
packed batches (DataCollatorWithFlattening with position_ids only or with cu_seq_lens, and cu_seq_lens over a
batch of several rows), static and dynamic key/value caches, the logit scale, bf16, and the refusals of inputs
it cannot serve. Logits are compared with each sequence run alone and with a float64 Taylor / hybrid attention on
the same weights. Skipped without transformers."""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", exc_type=ImportError)

from linattn_cuda.integrations import transformers as la_hf  # noqa: E402

if la_hf.version_tuple(transformers.__version__) < la_hf.version_tuple(la_hf.MIN_TRANSFORMERS):
    pytest.skip(f"transformers {transformers.__version__} is older than {la_hf.MIN_TRANSFORMERS}", allow_module_level=True)

from tests import transformers_cases as cases  # noqa: E402

TOL = dict(rtol=2e-5, atol=3e-5)  # float32 model vs float64 ground truth (measured <= 5e-6 on logits ~4)
SAME = dict(rtol=2e-5, atol=2e-5)  # float32 against float32, different batching
KINDS = ["taylor", "hybrid"]


@pytest.fixture(scope="module")
def names():
    return cases.register_all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(names, kind, side):
    model = cases.build("llama", names[kind][0])
    ids, mask, pos, seqs = cases.padded_batch([17, 9, 13], side)
    batch = cases.logits_of(model, ids, attention_mask=mask, position_ids=pos)
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        torch.testing.assert_close(batch[i, span], cases.logits_of(model, s[None])[0], **SAME)


def _flattened(seqs, flash_kwargs: bool):
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    batch.pop("labels")
    return batch


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_flattened_batch_equals_each_sequence_alone(names, kind, flash_kwargs):
    """DataCollatorWithFlattening's output -- by default input_ids and position_ids restarting at 0 only, or with
    cu_seq_lens_q/k -- : each sequence sees only itself (and equals the float64 ground truth, whose materialized
    mask transformers builds from the position ids)."""
    ours, reference = names[kind]
    model = cases.build("llama", ours)
    seqs = [cases.tokens(1, n, seed=20 + i)[0] for i, n in enumerate([7, 1, 12, 5])]
    batch = _flattened(seqs, flash_kwargs)
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    with torch.no_grad():
        packed = model(**batch).logits[0]
    start = 0
    for s in seqs:
        torch.testing.assert_close(packed[start : start + len(s)], cases.logits_of(model, s[None])[0], **SAME)
        start += len(s)
    ref = cases.twin(model, reference, torch.float64)
    want = cases.logits_of(ref, batch["input_ids"], position_ids=batch["position_ids"])[0]
    torch.testing.assert_close(packed.double(), want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_cu_seq_lens_over_a_batch_of_rows(names, kind):
    """cu_seq_lens with batch > 1 count the tokens of the flattened batch (as flash-attention reads them)."""
    model = cases.build("llama", names[kind][0])
    lengths = [[6, 4], [3, 7]]  # two rows of 10 tokens, two sequences each
    seqs = [[cases.tokens(1, n, seed=50 + 2 * r + c)[0] for c, n in enumerate(row)] for r, row in enumerate(lengths)]
    ids = torch.stack([torch.cat(row) for row in seqs])
    pos = torch.stack([torch.cat([torch.arange(len(s)) for s in row]) for row in seqs])
    cu = torch.tensor([0, 6, 10, 13, 20], dtype=torch.int32)
    with torch.no_grad():
        out = model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7,
                    use_cache=False).logits
        by_position_ids = model(ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, by_position_ids, **SAME)
    for r, row in enumerate(seqs):
        start = 0
        for s in row:
            torch.testing.assert_close(out[r, start : start + len(s)], cases.logits_of(model, s[None])[0], **SAME)
            start += len(s)
    with pytest.raises(ValueError, match=r"must end at the number of tokens of the flattened batch \(B \* L = 20"):
        model(ids, position_ids=pos, cu_seq_lens_q=cu[:-1], cu_seq_lens_k=cu[:-1], use_cache=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_key_value_caches_match_float64(names, kind, cache):
    """generate() with transformers' key/value caches: the static cache hands the attention its whole
    pre-allocated buffer and a mask as long as the filled part -- the keys are cut to the mask."""
    ours, reference = names[kind]
    model = cases.build("llama", ours)
    ref = cases.twin(model, reference, torch.float64)
    ids, mask, _, _ = cases.padded_batch([9, 5], "left", seed=31)
    out, got, want = cases.generate_and_reference_logits(model, ref, ids, mask, new_tokens=6,
                                                         cache_implementation=cache)
    assert type(cases.cache_of(out)).__name__ == {"static": "StaticCache", "dynamic": "DynamicCache"}[cache]
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_state_cache_off_keeps_the_key_value_cache(names, kind):
    model = cases.build("llama", {"taylor": "taylor_kv", "hybrid": "taylor_hybrid_kv"}[kind], num_key_value_heads=1)
    ref = cases.twin(model, names[kind][1], torch.float64)
    ids, mask, _, _ = cases.padded_batch([8, 6], "left", seed=32)
    out, got, want = cases.generate_and_reference_logits(model, ref, ids, mask, new_tokens=5)
    assert type(cases.cache_of(out)).__name__ == "DynamicCache"
    torch.testing.assert_close(got.double(), want, **TOL)


def test_static_cache_without_a_mask_is_refused(names):
    model = cases.build("llama", "taylor")
    cache = cases.static_cache(model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="pre-allocated \\(static\\) cache"):
        with torch.no_grad():
            model(cases.tokens(1, 5), **{cases.cache_kwarg(model): cache})


@pytest.mark.parametrize("kind", KINDS)
def test_scaling_is_honoured(names, kind):
    """Gemma-2 passes scaling = query_pre_attn_scalar^-1/2 (here 2^-1/2, not head_dim^-1/2)."""
    ours, reference = names[kind]
    full = dict(attn_logit_softcapping=None, layer_types=["full_attention"] * 2)
    model = cases.build("gemma2", ours, query_pre_attn_scalar=2, **full)
    ref = cases.twin(model, reference, torch.float64)
    ids = cases.tokens(2, 11)
    got = cases.logits_of(model, ids)
    torch.testing.assert_close(got.double(), cases.logits_of(ref, ids), **TOL)
    plain = cases.build("gemma2", ours, query_pre_attn_scalar=8, **full)  # 8 = head dim: the default scale
    plain.load_state_dict(model.state_dict())
    assert (cases.logits_of(plain, ids) - got).abs().max() > 100 * TOL["atol"]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_function_alone_matches_float64_math(names, kind):
    """One call of the registered function with a non-default scale and grouped-query heads."""
    attn = cases.build("llama", names[kind][0]).model.layers[0].self_attn
    b, h, hk, lq, d, scale = 2, 4, 2, 9, 8, 0.37
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, lq, d, generator=gen) for n in (h, hk, hk))
    fn = la_hf.taylor_attention_forward if kind == "taylor" else la_hf.hybrid_attention_forward
    kw = {} if kind == "taylor" else {"window": cases.WINDOW}
    out, weights = fn(attn, q, k, v, None, scaling=scale, **kw)
    assert weights is None and out.shape == (b, lq, h, d)
    kr, vr = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = q.double() @ kr.transpose(-1, -2) * scale
    i, j = torch.arange(lq)[:, None], torch.arange(lq)[None, :]
    w = 1 + s + s * s / 2
    if kind == "hybrid":
        w = torch.where(i - j < cases.WINDOW, torch.exp(s), w)
    w = w * (j <= i)
    want = ((w @ vr) / w.sum(-1, keepdim=True)).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_model(names, kind):
    model = cases.build("llama", names[kind][0])
    ids, mask, pos, _ = cases.padded_batch([10, 6], "left", seed=33)
    want = cases.logits_of(model, ids, attention_mask=mask, position_ids=pos)
    low = cases.twin(model, names[kind][0], torch.bfloat16)
    got = cases.logits_of(low, ids, attention_mask=mask, position_ids=pos)
    keep = mask.bool()
    torch.testing.assert_close(got[keep].float(), want[keep], rtol=5e-2, atol=1e-1)
    with torch.no_grad():
        out = low.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=cases.PAD,
                           eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(x).all() for x in out.logits)


def test_bad_masks_and_packing_combinations_are_refused(names):
    attn = cases.build("llama", "taylor").model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 8)
    kv = q[:, :2]
    with pytest.raises(ValueError, match="takes the 2-D padding mask"):
        la_hf.taylor_attention_forward(attn, q, kv, kv, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="both cu_seq_lens .* and a padding attention_mask"):
        la_hf.taylor_attention_forward(attn, q, kv, kv, torch.tensor([[0, 1, 1]]), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(NotImplementedError, match="cu_seq_lens_q must equal cu_seq_lens_k"):
        la_hf.hybrid_attention_forward(attn, q, kv, kv, None, cu_seq_lens_q=cu,
                                       cu_seq_lens_k=torch.tensor([0, 2, 3], dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="no learned attention sinks"):
        la_hf.taylor_attention_forward(attn, q, kv, kv, None, s_aux=torch.zeros(4))


def test_register_arguments_and_old_versions_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="kind must be one of"):
        la_hf.register("x", kind="softmax")
    with pytest.raises(ValueError, match="window is an option of kind='hybrid'"):
        la_hf.register("x", window=8)
    with pytest.raises(ValueError, match="needs window: a positive int"):
        la_hf.register("x", kind="hybrid", window=0)
    # transformers may swap its module object in sys.modules after a model is built: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.52.3")
    with pytest.raises(ImportError, match=r"needs transformers >= 4.53, found 4.52.3"):
        la_hf.register("taylor_old")
