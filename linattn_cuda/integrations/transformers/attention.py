"""The attention functions transformers calls: ``(module, query, key, value, attention_mask, **kwargs) -> (out, None)``.

Inputs as transformers' attention interface passes them: ``query [B, H, Lq, D]``, ``key``/``value [B, Hkv, Lk, *]``,
``attention_mask`` None or the 2-D ``[B, Lm]`` keep-mask of transformers' flash-attention mask function (registered
with the attention by :func:`register`), keyword arguments from the model. Output ``[B, Lq, H, Dv]``.

Every path a model takes, in order:

1. options the Taylor / hybrid weights cannot express are refused, naming the config field (soft-capping,
   sliding windows, attention sinks, attention dropout, head masks);
2. a state cache layer handed over by its ``update`` (:mod:`.handoff`): prefill or step against its fixed-size state;
3. packed sequences: ``cu_seq_lens_q/k`` (any batch size: the batch is flattened, as flash-attention does), or
   ``position_ids`` restarting (no mask, a new sequence wherever the position does not follow the previous one,
   as transformers' mask utilities detect packing) -> the varlen functions;
4. a mask shorter than the keys: a pre-allocated (static) cache, whose slots beyond the mask are unfilled: k/v are
   sliced to the mask (as transformers' flash-attention does); without a mask such a cache is refused;
5. otherwise dense attention with the key padding mask (causal end-aligned when Lq < Lk: a key/value cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import hybrid_attention, hybrid_attention_varlen, taylor_attention, taylor_attention_varlen
from . import handoff
from .hybrid_decoding import hybrid_attention_with_prefix

__all__ = ["AttentionSpec", "attention_forward", "taylor_attention_forward", "hybrid_attention_forward",
           "packed_cu_seqlens"]

KINDS = ("taylor", "hybrid")


@dataclass(frozen=True)
class AttentionSpec:
    """What a registered attention name computes: ``kind`` "taylor" or "hybrid" (``window`` keys with softmax
    weights), the kernels' ``backend``, and whether ``generate()`` decodes with the fixed-size state cache."""

    name: str = "taylor"
    kind: str = "taylor"
    window: Optional[int] = None
    backend: str = "auto"
    state_cache: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "hybrid":
            if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"kind='hybrid' needs window: a positive int (keys with softmax weights), got {self.window!r}")
        elif self.window is not None:
            raise ValueError(f"window is an option of kind='hybrid'; kind={self.kind!r} got window={self.window!r}")


_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")


def _config_fields(module, names) -> str:
    config = getattr(module, "config", None)
    found = [f"config.{n}={getattr(config, n)!r}" for n in names if config is not None and hasattr(config, n)]
    return ", ".join(found) if found else "config." + names[0]


def _refuse_unsupported(spec: AttentionSpec, module, dropout, kwargs) -> None:
    what = f"the {spec.name!r} attention ({spec.kind})"
    if dropout:
        raise NotImplementedError(
            f"{what} has no attention dropout; got dropout={dropout} ({_config_fields(module, _DROPOUT_FIELDS)}): "
            "set it to 0.0"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"{what} cannot apply attention-logit soft-capping (softcap={kwargs['softcap']}, "
            f"{_config_fields(module, ('attn_logit_softcapping',))}): the model would compute something else than "
            "its config says; use attn_logit_softcapping=None (a model trained without it)"
        )
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            f"{what} has no sliding-window variant (sliding_window={kwargs['sliding_window']}, "
            f"{_config_fields(module, ('sliding_window', 'layer_types'))}): set config.sliding_window=None and "
            "full_attention layer types"
        )
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{what} has no learned attention sinks ({name} given by {type(module).__name__}, the model's sink "
                "parameters): use a model without attention sinks"
            )
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError(f"{what} does not take a head_mask")


def _flatten_batch(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d] -> [B * L, H, d]`` (the packed layout of the varlen functions)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])


def packed_cu_seqlens(position_ids: Optional[torch.Tensor], batch: int, length: int) -> Optional[torch.Tensor]:
    """int32 ``cu_seqlens`` of the sequences packed in a ``[B, L]`` batch, flattened (a new sequence at every row
    start and wherever a position is not the previous one plus 1), or None when each row is one sequence."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != length or length < 2:
        return None
    if position_ids.shape[0] != batch:
        if position_ids.shape[0] != 1:
            return None
        position_ids = position_ids.expand(batch, -1)
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(restarts.any()):
        return None
    starts = torch.cat([torch.ones_like(restarts[:, :1]), restarts], dim=1).reshape(-1)
    first = starts.nonzero().flatten()
    return torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)


def _packed(spec, query, key, value, cu_q, cu_k, causal, scale, gqa):
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    cu_q = cu_q.to(device=query.device, dtype=torch.int32)
    cu_k = cu_q if cu_k is None else cu_k.to(device=query.device, dtype=torch.int32)
    if int(cu_q[-1]) != b * lq or int(cu_k[-1]) != b * lk:
        raise ValueError(
            f"cu_seq_lens_q / cu_seq_lens_k must end at the number of tokens of the flattened batch (B * L = {b * lq} "
            f"queries, {b * lk} keys), got {int(cu_q[-1])} and {int(cu_k[-1])}"
        )
    q, k, v = _flatten_batch(query), _flatten_batch(key), _flatten_batch(value)
    if spec.kind == "taylor":
        out = taylor_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=scale, enable_gqa=gqa,
                                      backend=spec.backend)
    else:
        if not torch.equal(cu_q, cu_k):
            raise NotImplementedError("hybrid attention of packed sequences is self-attention: cu_seq_lens_q must "
                                      "equal cu_seq_lens_k")
        triton = spec.backend == "triton" or (spec.backend == "auto" and q.device.type == "cuda")
        if not triton:  # one fused call over every sequence
            out = hybrid_attention_varlen(q, k, v, cu_q, window=spec.window, causal=causal, scale=scale,
                                          enable_gqa=gqa, backend=spec.backend)
            return out.reshape(b, lq, h, -1)
        # the Triton hybrid kernels take no packed sequences yet: one fused call per sequence
        bounds = cu_q.tolist()
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            seg = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, n, d]
            o = hybrid_attention(*seg, window=spec.window, causal=causal, scale=scale, enable_gqa=gqa,
                                 backend=spec.backend)
            pieces.append(o[0].transpose(0, 1))
        out = torch.cat(pieces, dim=0) if pieces else q.new_zeros(0, h, value.shape[-1])
    return out.reshape(b, lq, h, -1)


def _dense(spec, query, key, value, causal, scale, key_padding_mask, gqa):
    if spec.kind == "taylor":
        return taylor_attention(query, key, value, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                enable_gqa=gqa, backend=spec.backend)
    lq, lk = query.shape[2], key.shape[2]
    if lq == lk:
        return hybrid_attention(query, key, value, window=spec.window, causal=causal, scale=scale,
                                key_padding_mask=key_padding_mask, enable_gqa=gqa, backend=spec.backend)
    if not causal:
        raise NotImplementedError(f"non-causal hybrid attention is self-attention (Lq == Lk); got Lq={lq}, Lk={lk}")
    return hybrid_attention_with_prefix(query, key, value, window=spec.window, scale=scale,
                                        key_padding_mask=key_padding_mask, backend=spec.backend)


def _new_token_mask(attention_mask, batch: int, length: int) -> Optional[torch.Tensor]:
    """Key padding mask (True = padding) of the new tokens, from the 2-D keep-mask a state layer asked for."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(f"the state cache expects the [B, L] = [{batch}, {length}] mask of the new tokens, got "
                         f"{tuple(attention_mask.shape)}")
    keep = attention_mask[:, -length:].to(torch.bool)
    return None if bool(keep.all()) else ~keep


def attention_forward(
    spec: AttentionSpec,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Taylor or hybrid attention (``spec.kind``) with transformers' attention-function signature (module doc)."""
    _refuse_unsupported(spec, module, dropout, kwargs)
    is_causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
    b, h, lq, _ = query.shape
    gqa = key.shape[1] != h
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")

    layer = handoff.claim(kwargs, module, key, value)
    if layer is not None:  # fixed-size state: the layer holds everything before these tokens
        if cu_q is not None or cu_k is not None or (
            attention_mask is None and layer.get_seq_length() == lq and packed_cu_seqlens(position_ids, b, lq) is not None
        ):
            raise NotImplementedError(
                "packed sequences (cu_seq_lens_q/k, or position_ids restarting) cannot share a state cache: run them "
                "with use_cache=False"
            )
        out = layer.attend(query, key, value, _new_token_mask(attention_mask, b, lq), scale=scaling, causal=causal)
        return out.transpose(1, 2).contiguous(), None

    if cu_q is not None or cu_k is not None:  # packed: DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        if attention_mask is not None and not bool(attention_mask.to(torch.bool).all()):
            raise ValueError("got both cu_seq_lens (packed sequences) and a padding attention_mask: pass one of them")
        return _packed(spec, query, key, value, cu_q if cu_q is not None else cu_k, cu_k, causal, scaling, gqa), None

    lk = key.shape[2]
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != b:
            raise ValueError(
                f"the {spec.name!r} attention takes the 2-D padding mask [B, Lk] of transformers' flash-attention mask "
                f"function (registered by linattn_cuda.integrations.transformers.register); got a "
                f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}"
            )
        keep = attention_mask.to(torch.bool)
        if keep.shape[1] < lk:  # a pre-allocated (static) cache: the slots beyond the mask hold no token yet
            key, value = key[:, :, : keep.shape[1]], value[:, :, : keep.shape[1]]
            lk = keep.shape[1]
        elif keep.shape[1] > lk:
            keep = keep[:, -lk:]
        if lq > lk:
            raise ValueError(f"{lq} queries but a mask of {lk} keys: the queries must be the last keys")
        key_padding_mask = ~keep
    elif lq < lk and position_ids is not None and position_ids.dim() == 2:
        last = int(position_ids[:, -1].max()) + 1
        if last < lk:
            raise ValueError(
                f"{lk} keys for queries that end at position {last - 1} and no attention_mask: this looks like a "
                "pre-allocated (static) cache, whose unfilled slots would be attended to; pass the attention_mask "
                "(generate() does), which tells how many slots are filled"
            )
    elif lq == lk:
        cu = packed_cu_seqlens(position_ids, b, lq)
        if cu is not None:  # DataCollatorWithFlattening's default output: position_ids restart at 0
            return _packed(spec, query, key, value, cu, cu, causal, scaling, gqa), None
    out = _dense(spec, query, key, value, causal, scaling, key_padding_mask, gqa)
    return out.transpose(1, 2).contiguous(), None


def taylor_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                             backend: str = "auto", **kwargs):
    """Taylor attention with transformers' attention-function signature (see the module docstring)."""
    spec = AttentionSpec("taylor", "taylor", None, backend, False)
    return attention_forward(spec, module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def hybrid_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                             window: int = 64, backend: str = "auto", **kwargs):
    """Hybrid attention (softmax over the last ``window`` keys, Taylor beyond) with transformers' signature."""
    spec = AttentionSpec("taylor_hybrid", "hybrid", window, backend, False)
    return attention_forward(spec, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
