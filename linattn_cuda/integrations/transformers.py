"""Taylor attention as an attention implementation of Hugging Face transformers.

    import linattn_cuda.integrations.transformers as la_hf
    la_hf.register()                                   # once; name "taylor"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="taylor")

``register`` adds :func:`taylor_attention_forward` to transformers' ``AttentionInterface`` and, for the masks,
transformers' flash-attention mask function to ``AttentionMaskInterface`` under the same name: the attention then
receives ``None`` or the 2-D ``[B, Lk]`` padding mask (True = keep) instead of a materialized 4-D mask, and turns
it into a key padding mask. Every decoder whose attention layers call ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral,
Qwen2, Gemma, ... in transformers >= 4.53) runs with it:

* training forward and backward (causal, grouped-query attention read in place: ``enable_gqa``);
* right- or left-padded batches (``attention_mask``): padded keys are excluded; a padded query that sees only
  padding gets 0;
* packed batches (``DataCollatorWithFlattening``: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` in the kwargs):
  :func:`linattn_cuda.taylor_attention_varlen`, no padding at all;
* ``generate()`` with transformers' default ``DynamicCache``: the new tokens attend to the cached keys end-aligned
  (causal with Lq < Lk). Cost per generated token and layer: O(Lk (D + Dv)) per head (the quadratic form over the
  cached keys; the cpu kernels pick it for one query) and the cache holds the keys and values, O(Lk) memory.
  Why not a fixed-size Taylor state: in transformers' cache API the attention layer calls
  ``cache.update(k, v, layer_idx)`` and hands the attention function only the two tensors it returns, together
  with the mask -- never the cache. A state cache would have to return the state through those tensors, and fold
  the new keys into it before the attention function has seen the padding mask that decides which keys count.
  The O(M Dv)-per-token recurrent decoding is available outside transformers through
  :func:`linattn_cuda.taylor_attention_prefill` / ``taylor_attention_step`` and :class:`linattn_cuda.nn.TaylorAttention`.

The oldest transformers version supported is 4.53 (the first with ``AttentionMaskInterface``; see
``MIN_TRANSFORMERS``). Sliding-window and attention-sink variants (``sliding_window``, ``s_aux``) and attention
dropout are refused with an error rather than silently ignored.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..api import taylor_attention, taylor_attention_varlen

__all__ = ["MIN_TRANSFORMERS", "register", "taylor_attention_forward"]

MIN_TRANSFORMERS = "4.53"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def taylor_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    backend: str = "auto",
    **kwargs,
):
    """transformers' attention-function signature: ``query [B, H, Lq, D]``, ``key``/``value [B, Hkv, Lk, *]``,
    ``attention_mask`` None or ``[B, Lk]`` bool (True = keep; from the flash-attention mask function) ->
    ``(out [B, Lq, H, Dv], None)`` (no attention weights: Taylor attention never forms them in the linear form)."""
    if dropout:
        raise NotImplementedError(f"taylor attention has no attention dropout; got dropout={dropout} (set attention_dropout=0)")
    if kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("taylor attention supports neither sliding-window attention nor attention sinks")
    causal = bool(getattr(module, "is_causal", True))
    gqa = key.shape[1] != query.shape[1]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and query.shape[0] == 1:  # packed sequences (flattened batch)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
        out = taylor_attention_varlen(
            q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), causal=causal, scale=scaling, enable_gqa=gqa,
            backend=backend,
        )
        return out.unsqueeze(0), None
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "taylor attention takes the 2-D padding mask [B, Lk] of transformers' flash-attention mask function "
                f"(registered by linattn_cuda.integrations.transformers.register); got a {attention_mask.dim()}-D mask "
                f"of shape {tuple(attention_mask.shape)}"
            )
        keep = attention_mask[:, -key.shape[2]:].to(torch.bool)
        key_padding_mask = ~keep
    out = taylor_attention(
        query, key, value, causal=causal, scale=scaling, key_padding_mask=key_padding_mask, enable_gqa=gqa,
        backend=backend,
    )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = "taylor", *, backend: str = "auto") -> str:
    """Register Taylor attention with transformers' ``AttentionInterface`` and its mask function with
    ``AttentionMaskInterface`` under ``name``; returns ``name`` (pass it as ``attn_implementation``)."""
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as exc:
        raise ImportError(
            f"linattn_cuda.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}: "
            f'pip install -e ".[transformers]" ({exc})'
        ) from exc
    if _version_tuple(transformers.__version__) < _version_tuple(MIN_TRANSFORMERS):
        raise ImportError(
            f"linattn_cuda.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}, "
            f"found {transformers.__version__}"
        )

    def forward(module, query, key, value, attention_mask, **kwargs):
        return taylor_attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
