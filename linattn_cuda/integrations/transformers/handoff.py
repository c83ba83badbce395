"""How a state cache layer reaches the attention function that follows its ``update``.

transformers' attention layers call ``cache.update(key, value, layer_idx, ...)`` and then the attention function with
the tensors it returned. A state cache layer does not return the keys of the whole context (it has none), so the
attention function must find the layer to run the prefill/step against its state. Two routes:

* the attention kwargs: on recent transformers (5.25 does, 5.18 does not) Llama-style layers pass their kwargs dict
  to ``update`` (``cache.update(k, v, layer_idx, kwargs=kwargs)``) and then call the attention with ``**kwargs``, so
  a layer that stores itself under :data:`KWARG` arrives as a keyword argument;
* otherwise (older 5.x, GPT-NeoX, ...) a per-thread slot: ``update`` offers ``(layer, key, value)`` and the attention
  function claims it only if it receives exactly those tensor objects.

A hand-off that is never claimed is an error (the layer's next ``update`` raises), never a silently wrong output.
"""
from __future__ import annotations

import threading
from typing import Optional

__all__ = ["KWARG", "offer", "claim"]

KWARG = "linattn_state_layer"

_slot = threading.local()


def offer(layer, key, value, attention_kwargs: Optional[dict]) -> None:
    """Called by a state layer's ``update``: make ``layer`` reachable from the next attention call."""
    if isinstance(attention_kwargs, dict):
        attention_kwargs[KWARG] = layer
    _slot.pending = (layer, key, value)


def claim(kwargs: dict, module, key, value):
    """Called by the attention function: the state layer handed over for this call, or None (no state cache).

    Raises if a layer of this module's index is waiting but the keys are not the ones its ``update`` returned
    (the model changed them in between: the state path cannot serve such a model)."""
    layer = kwargs.pop(KWARG, None)
    pending = getattr(_slot, "pending", None)
    if layer is not None:
        if pending is not None and pending[0] is layer:
            _slot.pending = None
        return layer
    if pending is None:
        return None
    pending_layer, pending_key, pending_value = pending
    if pending_key is key and pending_value is value:
        _slot.pending = None
        return pending_layer
    if getattr(module, "layer_idx", None) == pending_layer.layer_idx:
        raise RuntimeError(
            f"{type(module).__name__} (layer {pending_layer.layer_idx}) passed the attention other key/value tensors "
            "than the ones its TaylorStateCache layer returned: this model transforms them between the cache and the "
            "attention, which the fixed-size state cannot serve. Generate with cache_implementation='dynamic' (the "
            "key/value cache) or register(..., state_cache=False)."
        )
    return None
