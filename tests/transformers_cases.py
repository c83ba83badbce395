"""Shared pieces of the tests/test_transformers_*.py files: tiny models of several families built from configs (no
downloads), and a float64 ground truth -- Taylor or hybrid attention written out densely, fed transformers' own
materialized 4-D boolean masks (causal, padding, packing from position_ids, static-cache slots), so that it shares
no mask handling with the code under test."""
from __future__ import annotations

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VOCAB = 61
PAD, BOS, EOS = 0, 1, 2


# Weights ~ N(0, 0.2) instead of transformers' 0.02: attention logits of order 1, so that Taylor, hybrid and softmax
# attention, or two windows, give logits that differ by O(1) (at 0.02 they agree to 1e-7 and no test could tell).
INIT_STD = 0.2


def _small(**extra):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=512,
                initializer_range=INIT_STD, **extra)


def family_config(family: str):
    """A tiny config of ``family`` (head dim 8, grouped-query attention where the family has it)."""
    T = transformers
    if family == "llama":
        return T.LlamaConfig(**_small(num_key_value_heads=2))
    if family == "qwen2":
        return T.Qwen2Config(**_small(num_key_value_heads=2))
    if family == "qwen3":
        return T.Qwen3Config(**_small(num_key_value_heads=2, head_dim=8))
    if family == "mistral":
        return T.MistralConfig(**_small(num_key_value_heads=2, head_dim=8, sliding_window=None))
    if family == "gemma":
        return T.GemmaConfig(**_small(num_key_value_heads=2, head_dim=8))
    if family == "gemma_hd256":  # Gemma's own head dim
        return T.GemmaConfig(**_small(num_key_value_heads=1, head_dim=256))
    if family == "phi3":
        return T.Phi3Config(**_small(num_key_value_heads=2))
    if family == "gpt_neox":
        return T.GPTNeoXConfig(**_small())
    if family == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=BOS,
                            eos_token_id=EOS, pad_token_id=PAD, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                            initializer_range=INIT_STD)
    if family == "bert":
        return T.BertConfig(**_small(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0))
    if family == "gemma2":  # soft-capping and sliding windows as configured by default
        return T.Gemma2Config(**_small(num_key_value_heads=2, head_dim=8))
    raise ValueError(family)


DECODERS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt_neox", "gpt2"]

# Families that build their own 4-D masks (not through transformers' mask interface) before these versions: the
# attention then refuses the mask with an error. GPT-2 moved between 4.53 and 4.55, BERT in 5.0 (4.57 still not).
FAMILY_SINCE = {"gpt2": "4.55", "bert": "5.0"}


def family_runs(family: str) -> bool:
    """Whether ``family`` passes the attention the 2-D mask on the installed transformers."""
    from linattn_cuda.integrations.transformers import version_tuple

    since = FAMILY_SINCE.get(family)
    return since is None or version_tuple(transformers.__version__) >= version_tuple(since)


def build(family_or_config, attn: str, *, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny model with ``attn`` as attention implementation, random weights from ``seed``, eval mode."""
    config = family_config(family_or_config) if isinstance(family_or_config, str) else family_or_config
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForMaskedLM if isinstance(config, transformers.BertConfig) else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation=attn).to(dtype).eval()  # (from_config's dtype argument
    # is named torch_dtype before transformers 4.56)


def twin(model, attn: str, dtype=None):
    """The same weights under another attention implementation (and dtype)."""
    other = build(model.config.__class__.from_dict(model.config.to_dict()), attn, dtype=dtype or model.dtype)
    other.load_state_dict(model.state_dict())
    return other.to(dtype or model.dtype).eval()


# ---- float64 ground truth ----------------------------------------------------------------------------------------

def _materialized_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _dense_reference(kind: str, window):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert attention_mask is not None and attention_mask.dim() == 4, "the reference needs a materialized mask"
        out_dtype = query.dtype
        q, k, v = query.double(), key.double(), value.double()
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        s = scale * q @ k.transpose(-1, -2)
        w = 1 + s + s * s / 2
        keep = attention_mask.to(torch.bool).expand(s.shape)
        if kind == "hybrid":
            lq, lk = s.shape[-2:]
            j = torch.arange(lk)
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
            if causal:  # the query's own position: the last key it may see (padded query rows do not matter)
                pos = torch.where(keep, j, torch.full_like(j, -1)).amax(-1, keepdim=True)
                inside = (pos - j >= 0) & (pos - j < window)
            else:
                pos = torch.arange(lq)[:, None] + lk - lq
                inside = (pos - j).abs() < window
            w = torch.where(inside, torch.exp(s), w)
        w = torch.where(keep, w, torch.zeros_like(w))
        den = w.sum(-1, keepdim=True)
        out = torch.where(den > 0, (w @ v) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros(()))
        return out.transpose(1, 2).contiguous().to(out_dtype), None

    return attention


def register_references(window: int) -> tuple[str, str]:
    """Register the float64 Taylor and hybrid(window) ground truths; returns their names."""
    names = ("taylor_f64", f"hybrid_f64_w{window}")
    for name, kind in zip(names, ("taylor", "hybrid")):
        AttentionInterface.register(name, _dense_reference(kind, window))
        AttentionMaskInterface.register(name, _materialized_mask)
    return names


# ---- inputs --------------------------------------------------------------------------------------------------------

def tokens(b: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def padded_batch(lengths, side: str, seed: int = 10):
    """(ids, attention_mask, position_ids, the sequences) of a padded batch, positions counted from the first token."""
    seqs = [tokens(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span], mask[i, span] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, position_ids, seqs


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate() gives a (left-)padded batch."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def logits_of(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


WINDOW = 4  # short, so that prompts of ~10 tokens have keys inside and beyond the hybrid's window
ATTN = {"taylor": "taylor", "hybrid": "taylor_hybrid"}


def register_all() -> dict:
    """Register the attentions under test and the float64 ground truths; returns {kind: (ours, reference)}."""
    from linattn_cuda.integrations import transformers as la_hf

    la_hf.register("taylor")
    la_hf.register("taylor_hybrid", kind="hybrid", window=WINDOW)
    la_hf.register("taylor_kv", state_cache=False)
    la_hf.register("taylor_hybrid_kv", kind="hybrid", window=WINDOW, state_cache=False)
    ref_taylor, ref_hybrid = register_references(WINDOW)
    return {"taylor": ("taylor", ref_taylor), "hybrid": ("taylor_hybrid", ref_hybrid)}


def cache_of(output):
    """The cache a generate() output returns (``cache`` on transformers 5.25, ``past_key_values`` before)."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def generate_and_reference_logits(model, reference, ids, mask, new_tokens: int, **kwargs):
    """Greedy generate() with output_logits, and the reference's full-forward logits at the same positions."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=None, output_logits=True,
              return_dict_in_generate=True)
    kw.update(kwargs)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kw)
    seq = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    want = logits_of(reference, seq, attention_mask=full_mask, position_ids=generation_positions(full_mask))
    width = ids.shape[1]
    got = torch.stack(list(out.logits), 1)  # [B, new, V]
    return out, got, want[:, width - 1 :]


def static_cache(config, max_cache_len: int, batch_size: int = 1):
    """A StaticCache (its constructor wanted the batch size before transformers 4.56)."""
    import inspect

    kw = dict(config=config, max_cache_len=max_cache_len)
    if "max_batch_size" in inspect.signature(transformers.StaticCache.__init__).parameters:
        kw["max_batch_size"] = batch_size
    return transformers.StaticCache(**kw)


def cache_kwarg(model) -> str:
    """The forward argument that takes a cache: ``cache`` (transformers 5.25) or ``past_key_values`` (before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
