"""Taylor and hybrid attention as attention implementations of Hugging Face transformers.

    import linattn_cuda.integrations.transformers as la_hf
    la_hf.register()                                               # "taylor"
    la_hf.register("taylor_hybrid", kind="hybrid", window=64)      # softmax over 64 keys, Taylor beyond
    model = AutoModelForCausalLM.from_config(config, attn_implementation="taylor")
    model.generate(ids, attention_mask=mask, max_new_tokens=64)    # fixed-size state (transformers >= 5.0)

Every model whose attention layers call ``ALL_ATTENTION_FUNCTIONS`` runs with it: training forward/backward (GQA
read in place), padded batches, packed batches (``cu_seq_lens_q/k`` or ``position_ids`` restarting), static and
dynamic key/value caches, and -- on transformers >= 5.0 -- ``generate()`` with a cache whose size does not grow with
the context (:class:`TaylorStateCache`). Options the weights cannot express are refused with an error naming the
config field. Modules:

* :mod:`.attention`: the attention functions and every input path (module docstring lists them);
* :mod:`.cache`: the state cache and its layers (transformers >= 5.0);
* :mod:`.hybrid_decoding`: prefill/step of hybrid attention against a ring buffer + Taylor state;
* :mod:`.handoff`: how a cache layer reaches the attention function;
* :mod:`.registration`: ``register`` and the hook that makes the state cache generate()'s default.

Versions: transformers >= 4.53 (``MIN_TRANSFORMERS``) for the attention (key/value caches); >= 5.0
(``MIN_TRANSFORMERS_STATE_CACHE``) for the state cache. Tested: 4.53.3, 5.0.0 and 5.25.0 (see the README).
"""
from .attention import AttentionSpec, hybrid_attention_forward, packed_cu_seqlens, taylor_attention_forward
from .hybrid_decoding import HybridState, empty_hybrid_state, hybrid_prefill, hybrid_step
from .registration import MIN_TRANSFORMERS, MIN_TRANSFORMERS_STATE_CACHE, register, version_tuple

_version_tuple = version_tuple  # the name older callers use

__all__ = [
    "MIN_TRANSFORMERS",
    "MIN_TRANSFORMERS_STATE_CACHE",
    "register",
    "taylor_attention_forward",
    "hybrid_attention_forward",
    "TaylorStateCache",
    "HybridState",
    "empty_hybrid_state",
    "hybrid_prefill",
    "hybrid_step",
    "AttentionSpec",
    "packed_cu_seqlens",
]

_CACHE_NAMES = ("TaylorStateCache", "TaylorStateLayer", "HybridStateLayer")


def __getattr__(name):  # the cache classes subclass transformers' Cache: import transformers only when asked
    if name in _CACHE_NAMES:
        try:
            from . import cache
        except ImportError as exc:
            raise ImportError(
                f"{name} needs transformers >= {MIN_TRANSFORMERS_STATE_CACHE} (cache layers): {exc}"
            ) from exc
        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
