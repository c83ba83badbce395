"""generate() with the fixed-size state cache (transformers >= 5.0): cache size independent of the prompt, beam
search and batch reindexing, a prompt continued in chunks, attention_mask updates, crop and assisted decoding, and
the errors that keep a state cache from computing something wrong. Tiny models from configs, no downloads; logits
compared with the key/value path and with float64 full forwards. Skipped without transformers."""
import pytest
import torch

transformers = pytest.importorskip("transformers", exc_type=ImportError)

from linattn_cuda import feature_dim  # noqa: E402
from linattn_cuda.integrations import transformers as la_hf  # noqa: E402

if la_hf.version_tuple(transformers.__version__) < la_hf.version_tuple(la_hf.MIN_TRANSFORMERS_STATE_CACHE):
    pytest.skip(f"the state cache needs transformers >= {la_hf.MIN_TRANSFORMERS_STATE_CACHE}", allow_module_level=True)

from tests import transformers_cases as cases  # noqa: E402

TOL = dict(rtol=2e-5, atol=3e-5)  # float32 model vs float64 ground truth
SAME = dict(rtol=2e-5, atol=2e-5)  # float32 state path vs float32 key/value path
KINDS = ["taylor", "hybrid"]
KV = {"taylor": "taylor_kv", "hybrid": "taylor_hybrid_kv"}  # the same attentions with transformers' key/value cache
GREEDY = dict(do_sample=False, pad_token_id=cases.PAD, eos_token_id=None)


@pytest.fixture(scope="module")
def names():
    return cases.register_all()


def forward(model, ids, cache, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=True, **{cases.cache_kwarg(model): cache}, **kwargs).logits


@pytest.mark.parametrize("kind", KINDS)
def test_cache_size_does_not_depend_on_the_prompt(names, kind):
    model = cases.build("llama", names[kind][0])
    sizes = []
    for length in (6, 40):
        out = model.generate(cases.tokens(2, length), max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        cache = cases.cache_of(out)
        assert isinstance(cache, la_hf.TaylorStateCache)
        sizes.append(cache.nbytes)
    b, hk, d = 2, model.config.num_key_value_heads, model.config.head_dim
    m = feature_dim(d)
    per_layer = b * hk * (m * d + m) * 4  # fp32 kv [B, Hkv, M, Dv] and k_sum [B, Hkv, M]
    if kind == "hybrid":  # kv has one more column (the sink's), plus the ring of keys, values and their flags
        ring = cases.WINDOW - 1
        per_layer += b * hk * m * 4 + b * hk * ring * 2 * d * 4 + b * ring
    assert sizes == [per_layer * model.config.num_hidden_layers] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_equals_the_key_value_cache(names, kind):
    """Beam search reorders the cache every step (reorder_cache): same beams and scores as with keys/values."""
    model = cases.build("llama", names[kind][0])
    kv = cases.twin(model, KV[kind])
    ids, mask, _, _ = cases.padded_batch([8, 5], "left", seed=60)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
              **GREEDY)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, **kw)
        want = kv.generate(ids, attention_mask=mask, **kw)
    assert isinstance(cases.cache_of(got), la_hf.TaylorStateCache)
    assert type(cases.cache_of(want)).__name__ == "DynamicCache"
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, **SAME)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_selection_and_repetition(names, kind):
    """batch_select_indices / batch_repeat_interleave on a filled cache, then more tokens: the logits of decoding
    the selected (repeated) rows from scratch."""
    model = cases.build("llama", names[kind][0])
    ids = cases.tokens(3, 9, seed=61)
    nxt = cases.tokens(3, 2, seed=62)
    cache = la_hf.TaylorStateCache(model.config)
    forward(model, ids, cache)
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)  # rows 2, 2, 0, 0
    rows = torch.tensor([2, 2, 0, 0])
    got = forward(model, nxt[rows], cache)
    want = cases.logits_of(model, torch.cat([ids, nxt], 1)[rows])[:, -2:]
    torch.testing.assert_close(got, want, **SAME)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_in_chunks_then_steps_matches_float64(names, kind):
    """A prompt fed in two chunks (the second against the state of the first), then tokens one at a time."""
    ours, reference = names[kind]
    model = cases.build("llama", ours)
    ref = cases.twin(model, reference, torch.float64)
    ids = cases.tokens(2, 16, seed=63)
    cache = la_hf.TaylorStateCache(model.config)
    pieces = [forward(model, ids[:, :7], cache), forward(model, ids[:, 7:12], cache)]
    pieces += [forward(model, ids[:, t : t + 1], cache) for t in range(12, 16)]
    assert cache.get_seq_length() == 16
    torch.testing.assert_close(torch.cat(pieces, 1).double(), cases.logits_of(ref, ids), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_chunked_prefill(names, kind):
    """generate(prefill_chunk_size=4): a left-padded prompt of 11 tokens goes in chunks through the state."""
    if not hasattr(transformers.GenerationConfig(), "prefill_chunk_size"):
        pytest.skip(f"transformers {transformers.__version__} has no chunked prefill")
    ours, reference = names[kind]
    model = cases.build("llama", ours)
    ref = cases.twin(model, reference, torch.float64)
    ids, mask, _, _ = cases.padded_batch([11, 7], "left", seed=66)
    out, got, want = cases.generate_and_reference_logits(model, ref, ids, mask, new_tokens=4, prefill_chunk_size=4)
    assert isinstance(cases.cache_of(out), la_hf.TaylorStateCache)
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_mask_updates_during_decoding(names, kind):
    """A left-padded prompt, then steps in which one row's new token is masked out (as a caller may do for a
    finished row): same logits as the key/value cache given the same masks."""
    model = cases.build("llama", names[kind][0])
    kv = cases.twin(model, KV[kind])
    ids, mask, _, _ = cases.padded_batch([9, 6], "left", seed=64)
    state = la_hf.TaylorStateCache(model.config)
    keys = transformers.DynamicCache(config=kv.config)
    got = [forward(model, ids, state, attention_mask=mask)]
    want = [forward(kv, ids, keys, attention_mask=mask)]
    new = cases.tokens(2, 4, seed=65)
    for t in range(4):
        mask = torch.cat([mask, torch.tensor([[1], [int(t % 2 == 0)]])], 1)  # row 1: every other token masked
        pos = (mask.sum(-1, keepdim=True) - 1)
        got.append(forward(model, new[:, t : t + 1], state, attention_mask=mask, position_ids=pos))
        want.append(forward(kv, new[:, t : t + 1], keys, attention_mask=mask, position_ids=pos))
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), **SAME)  # masked positions included


def test_crop_is_refused_and_assisted_decoding_keeps_keys(names):
    model = cases.build("llama", "taylor")
    cache = la_hf.TaylorStateCache(model.config)
    forward(model, cases.tokens(1, 5), cache)
    cache.crop(0)  # removes nothing: allowed
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-2)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    kw = dict(GREEDY, eos_token_id=cases.EOS)  # (prompt lookup of transformers 5.0 fails without an eos token)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True, **kw)
        assisted = model.generate(ids, max_new_tokens=5, prompt_lookup_num_tokens=2, return_dict_in_generate=True, **kw)
    assert isinstance(cases.cache_of(plain), la_hf.TaylorStateCache)
    assert type(cases.cache_of(assisted)).__name__ == "DynamicCache"  # it crops: the key/value cache
    assert torch.equal(plain.sequences, assisted.sequences)


def test_state_cache_misuse_is_an_error_not_a_wrong_output(names):
    sdpa = cases.build("llama", "sdpa")
    with pytest.raises(ValueError, match="registered by linattn_cuda.integrations.transformers.register; .* 'sdpa'"):
        la_hf.TaylorStateCache(sdpa.config)
    model = cases.build("llama", "taylor")
    cache = la_hf.TaylorStateCache(model.config)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 3, 8)
    layer.update(k, k)  # nobody attends
    with pytest.raises(RuntimeError, match="the attention never consumed the previous tokens"):
        layer.update(k, k)
    cache = la_hf.TaylorStateCache(model.config)
    batch = {"input_ids": cases.tokens(1, 6), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}
    with pytest.raises(NotImplementedError, match="packed sequences .* cannot share a state cache"):
        forward(model, batch["input_ids"], cache, position_ids=batch["position_ids"])


def test_benchmark_script_runs(tmp_path):
    """bench/hf_generate.py on a toy size: its table, JSON and plot, and the fixed cache bytes it reports."""
    import json

    from bench import hf_generate

    out = tmp_path / "hf_generate"
    hf_generate.main(["--lengths", "16,40", "--new-tokens", "3", "--repeats", "1", "--hidden", "32", "--layers", "1",
                      "--heads", "4", "--kv-heads", "2", "--vocab", "61", "--window", str(cases.WINDOW), "--out", str(out)])
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert set(results) == {"taylor", "taylor_hybrid", "sdpa"}
    for impl in ("taylor", "taylor_hybrid"):
        assert len({row["cache_bytes"] for row in results[impl]}) == 1
        assert {row["cache_type"] for row in results[impl]} == {"TaylorStateCache"}
    sdpa = [row["cache_bytes"] for row in results["sdpa"]]
    assert sdpa[1] > sdpa[0]
    assert "| Taylor (state cache) | 40 |" in out.with_suffix(".md").read_text()
