"""Fixed-size decoding caches for transformers >= 5.0: one state layer per decoder layer.

A :class:`TaylorStateCache` is a transformers ``Cache`` whose layers keep, instead of keys and values,

* ``taylor``: the Taylor state ``(kv [B, Hkv, M, Dv], k_sum [B, Hkv, M])`` of every token so far (float32);
* ``hybrid``: the last ``window - 1`` keys/values in a ring buffer plus the Taylor state of the keys before them
  (:mod:`.hybrid_decoding`).

Their size is fixed by the batch, the heads and the window, never by the number of tokens. How a layer works with a
model's attention layer: ``update(key, value, ...)`` records the new tokens, hands the layer to the attention
function (:mod:`.handoff`) and returns the new keys/values unchanged; ``get_mask_sizes`` asks transformers' mask
function for the new tokens' mask only; the attention function then calls :meth:`attend`, which runs the prefill
(several tokens, or padding) or the step (one token) against the state -- after it has seen which new keys are
padding, so padded keys never enter the state.

Beam search and batch selection reindex the state (``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``). ``crop`` cannot undo tokens folded into a state: it raises unless it removes nothing
(assisted generation, which crops, is therefore refused by transformers before it starts: use
``cache_implementation="dynamic"`` for it). The state of tokens whose ``attention_mask`` changes after they were
seen is not revisited: a state cache reads the mask of the new tokens only.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ... import TaylorState, taylor_attention_prefill, taylor_attention_step
from . import handoff
from .attention import AttentionSpec
from .hybrid_decoding import HybridState, hybrid_prefill, hybrid_step

__all__ = ["TaylorStateCache", "TaylorStateLayer", "HybridStateLayer"]


class _StateLayer(CacheLayerMixin):
    """The parts every state layer shares: token count, hand-off, batch reindexing; ``self.state`` is None before
    the first tokens, else an object whose batch-indexed tensors :meth:`_map_state` transforms."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, spec: AttentionSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.seen = 0
        self.state = None
        self._awaiting = False

    def __repr__(self):
        return f"{type(self).__name__}(layer {self.layer_idx}, {self.seen} tokens, {self.nbytes} bytes)"

    # --- transformers' cache-layer interface ---------------------------------------------------------------------
    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        self.is_initialized = True  # the state is allocated by the first prefill, in its shape and dtype

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._awaiting:
            raise RuntimeError(
                f"{type(self).__name__} {self.layer_idx}: the attention never consumed the previous tokens (the model's "
                "attention is not one registered by linattn_cuda.integrations.transformers, or it failed): the state "
                "is incomplete; make a new cache"
            )
        self.lazy_initialization()
        handoff.offer(self, key_states, value_states, kwargs.get("kwargs"))
        self._awaiting = True
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv_length, kv_offset) of the 2-D mask the attention receives: only the new tokens'."""
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)  # 5.0: cache_position
        return q, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # no sequence dimension

    get_max_cache_shape = get_max_length  # its name in transformers 5.0

    def crop(self, tokens_to_remove: int) -> None:
        # tokens_to_remove <= 0 removes |n| tokens (current API); n > 0 is an absolute length (older API)
        if tokens_to_remove == 0 or tokens_to_remove == self.seen:
            return
        raise NotImplementedError(
            f"a fixed-size Taylor state cannot be cropped (asked crop({tokens_to_remove}) with {self.seen} tokens): "
            "the tokens are folded into the state. For assisted/speculative decoding or rollbacks use "
            "cache_implementation='dynamic' (the key/value cache)"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.state, self.seen, self._awaiting = None, 0, False

    def offload(self):  # the state is small and stays where it is
        return None

    def prefetch(self):
        return None

    # --- the state -----------------------------------------------------------------------------------------------
    def _map_state(self, fn) -> None:
        raise NotImplementedError

    def _tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's state (0 before the first tokens)."""
        return sum(t.numel() * t.element_size() for t in self._tensors()) if self.state is not None else 0

    def attend(self, query, key, value, key_padding_mask, *, scale: Optional[float], causal: bool) -> torch.Tensor:
        """Attention of the new tokens ``query [B, H, L, D]`` over everything seen so far, folding their keys
        (``key_padding_mask [B, L]`` True = padding: left out) into the state; returns ``[B, H, L, Dv]``."""
        if not causal:
            raise NotImplementedError("a state cache serves causal self-attention only (the model's attention is "
                                      "not causal: run it without a cache)")
        self._awaiting = False
        if query.shape[2] == 0:
            return query.new_zeros(*query.shape[:3], value.shape[-1])
        return self._attend(query, key, value, key_padding_mask, scale, key.shape[1] != query.shape[1])


class TaylorStateLayer(_StateLayer):
    """Taylor attention: ``state`` is a :class:`linattn_cuda.TaylorState`; O(M * Dv) per head and token."""

    def _attend(self, query, key, value, key_padding_mask, scale, gqa):
        backend = self.spec.backend
        if self.state is None or query.shape[2] > 1 or key_padding_mask is not None:
            out, self.state = taylor_attention_prefill(query, key, value, scale=scale, key_padding_mask=key_padding_mask,
                                                       initial_state=self.state, enable_gqa=gqa, backend=backend)
        else:
            out, self.state = taylor_attention_step(query, key, value, self.state, scale=scale, enable_gqa=gqa,
                                                    backend=backend)
        return out

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = TaylorState(*(fn(t) for t in self.state))

    def _tensors(self):
        return list(self.state)


class HybridStateLayer(_StateLayer):
    """Hybrid attention: ``state`` is a :class:`.hybrid_decoding.HybridState` (ring buffer of the last
    ``window - 1`` keys/values + Taylor state); O(window * D + M * Dv) per head and token."""

    def _attend(self, query, key, value, key_padding_mask, scale, gqa):
        if self.state is not None and query.shape[2] == 1:
            valid = None if key_padding_mask is None else ~key_padding_mask[:, 0]
            return hybrid_step(query, key, value, self.state, valid=valid)
        out, self.state = hybrid_prefill(query, key, value, window=self.spec.window, scale=scale,
                                         key_padding_mask=key_padding_mask, state=self.state, enable_gqa=gqa,
                                         backend=self.spec.backend)
        return out

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map_batch(fn)

    def _tensors(self):
        return self.state.tensors()


def layer_types_are_full(config) -> bool:
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or all(t == "full_attention" for t in layer_types)


class TaylorStateCache(Cache):
    """A cache of fixed size for a model whose attention is registered by
    :func:`linattn_cuda.integrations.transformers.register` (``generate()`` builds one by default).

        cache = TaylorStateCache(model.config)
        out = model.generate(ids, past_key_values=cache, ...)     # ``cache=`` on transformers 5.25

    ``attn_implementation`` (default: the config's) names the registered attention whose kind/window it serves.
    """

    def __init__(self, config, *, attn_implementation: Optional[str] = None):
        from .registration import registered_spec

        text_config = config.get_text_config(decoder=True)
        name = attn_implementation or text_config._attn_implementation
        spec = registered_spec(name)
        if spec is None:
            raise ValueError(
                f"TaylorStateCache serves an attention registered by linattn_cuda.integrations.transformers.register; "
                f"the config's attention implementation is {name!r}"
            )
        if not layer_types_are_full(text_config):
            raise ValueError(f"TaylorStateCache needs full_attention layers only, got layer_types={text_config.layer_types}")
        layer_class = TaylorStateLayer if spec.kind == "taylor" else HybridStateLayer
        layers = [layer_class(spec, i) for i in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(layer.nbytes for layer in self.layers)
