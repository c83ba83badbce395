"""linattn_cuda.integrations.transformers with tiny Llama models built from configs (no downloads): the
registered attention against the reference backend and against float64 math, padding, packing, gradients,
generate(). Skipped without transformers."""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", exc_type=ImportError)

import linattn_cuda as la  # noqa: E402
from linattn_cuda._extension import has_kernel  # noqa: E402
from linattn_cuda.integrations import transformers as la_hf  # noqa: E402

if la_hf._version_tuple(transformers.__version__) < la_hf._version_tuple(la_hf.MIN_TRANSFORMERS):
    pytest.skip(f"transformers {transformers.__version__} is older than {la_hf.MIN_TRANSFORMERS}", allow_module_level=True)

FAST = "cpu" if has_kernel("CPU") else "reference"


@pytest.fixture(scope="module", autouse=True)
def registered():
    la_hf.register("taylor")
    la_hf.register("taylor_ref", backend="reference")


def tiny_llama(attn="taylor", *, heads=4, kv_heads=2, seed=0, dtype=torch.float32):
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, torch_dtype=dtype)
    return model.eval()


def twin(model, attn):
    other = tiny_llama(attn, heads=model.config.num_attention_heads, kv_heads=model.config.num_key_value_heads,
                       dtype=model.dtype)
    other.load_state_dict(model.state_dict())
    return other


def tokens(b, length, seed=1):
    return torch.randint(3, 61, (b, length), generator=torch.Generator().manual_seed(seed))


def test_registered_attention_is_used_and_matches_float64_math():
    """One attention layer's output against SDPA-shaped float64 Taylor math on repeated heads."""
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    assert model.config._attn_implementation == "taylor"
    b, h, hk, lq, d = 2, 4, 2, 9, 8
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, lq, d, generator=gen) for n in (h, hk, hk))
    out, weights = la_hf.taylor_attention_forward(attn, q, k, v, None, scaling=d**-0.5, backend=FAST)
    assert weights is None and out.shape == (b, lq, h, d)
    kr, vr = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = q.double() @ kr.transpose(-1, -2) * d**-0.5
    w = (1 + s + s * s / 2) * torch.ones(lq, lq).tril()
    want = ((w @ vr) / w.sum(-1, keepdim=True)).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_forward_and_backward_match_the_reference_backend(kv_heads):
    model = tiny_llama("taylor", kv_heads=kv_heads)
    ref = twin(model, "taylor_ref")
    ids = tokens(2, 23)
    labels = ids.clone()
    out = model(ids, labels=labels)
    want = ref(ids, labels=labels)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    want.loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(side):
    """Padding keys are excluded: the logits of the real tokens equal those of each sequence run alone."""
    model = tiny_llama()
    lengths = [17, 9, 13]
    width = max(lengths)
    seqs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span], mask[i, span] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            torch.testing.assert_close(batch[i, span], alone, rtol=1e-4, atol=1e-4)


def test_packed_batch_uses_varlen_and_equals_each_sequence_alone():
    """A flattened batch with cu_seq_lens (as DataCollatorWithFlattening makes it) runs through
    taylor_attention_varlen: no padding, and each sequence sees only itself."""
    model = tiny_llama()
    lengths = [7, 1, 20]
    seqs = [tokens(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 8, 28], dtype=torch.int32)
    calls = []
    real = la_hf.taylor_attention_varlen

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    la_hf.taylor_attention_varlen = spy
    try:
        with torch.no_grad():
            packed = model(ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=20,
                           max_length_k=20).logits[0]
    finally:
        la_hf.taylor_attention_varlen = real
    assert len(calls) == model.config.num_hidden_layers
    start = 0
    with torch.no_grad():
        for s in seqs:
            torch.testing.assert_close(packed[start : start + len(s)], model(s[None]).logits[0], rtol=1e-4, atol=1e-4)
            start += len(s)


def test_generate_with_cache_equals_recomputing_and_each_prompt_alone():
    """Greedy generate() on a left-padded batch: the cached decoding (new tokens against cached keys, end-aligned
    causal) gives the tokens of a full recomputation at every step, and of each prompt generated alone."""
    model = tiny_llama()
    prompts = [tokens(1, n, seed=30 + i)[0] for i, n in enumerate([11, 4])]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
        recomputed = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
        assert torch.equal(cached, recomputed)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
            assert torch.equal(cached[i, width:], alone[0, len(p):])


def test_bfloat16_model_runs():
    model = tiny_llama(dtype=torch.bfloat16)
    ref = twin(model, "taylor_ref")
    ids = tokens(2, 15)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ref(ids).logits.float(), rtol=3e-2, atol=3e-2)


def test_unsupported_options_and_old_versions_are_refused(monkeypatch):
    attn = tiny_llama().model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        la_hf.taylor_attention_forward(attn, q, q[:, :2], q[:, :2], None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        la_hf.taylor_attention_forward(attn, q, q[:, :2], q[:, :2], None, sliding_window=4)
    with pytest.raises(ValueError, match="takes the 2-D padding mask"):
        la_hf.taylor_attention_forward(attn, q, q[:, :2], q[:, :2], torch.ones(1, 1, 3, 3, dtype=torch.bool))
    # transformers may swap its module object in sys.modules after a model is built: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.52.3")
    with pytest.raises(ImportError, match=r"needs transformers >= 4.53, found 4.52.3"):
        la_hf.register("taylor_old")
