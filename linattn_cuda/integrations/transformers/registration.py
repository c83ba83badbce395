"""``register()``: the attention and its mask function in transformers' registries, and the state cache of generate().

transformers builds a ``generate()`` cache from the config alone (``DynamicCache(config)``, layer classes chosen by
``config.layer_types``); the layer types of existing model families are a closed list that their modeling code
indexes its masks by, so a new type cannot be given to, say, a Qwen2 model. ``register`` therefore wraps
``GenerationMixin._prepare_cache_for_generation`` once: after transformers has prepared its cache, a fresh
``DynamicCache`` of a model whose attention implementation was registered here (with ``state_cache=True``) is
replaced by a :class:`.cache.TaylorStateCache`. Any explicit choice is left alone: a cache passed by the caller,
``cache_implementation="dynamic"`` / ``"static"`` / ``"offloaded"`` / ..., assisted generation (it crops the
cache), encoder-decoder models and configs with other layer types than ``full_attention``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

from .attention import AttentionSpec, attention_forward

__all__ = ["MIN_TRANSFORMERS", "MIN_TRANSFORMERS_STATE_CACHE", "register", "registered_spec", "version_tuple"]

MIN_TRANSFORMERS = "4.53"  # the first with AttentionMaskInterface
MIN_TRANSFORMERS_STATE_CACHE = "5.0"  # cache layers (CacheLayerMixin) and Cache(layers=...)

_REGISTRY: dict[str, AttentionSpec] = {}
_HOOK_ATTRIBUTE = "__linattn_state_cache_hook__"


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def registered_spec(name: Optional[str]) -> Optional[AttentionSpec]:
    return _REGISTRY.get(name) if isinstance(name, str) else None


def state_cache_supported() -> bool:
    import transformers

    return version_tuple(transformers.__version__) >= version_tuple(MIN_TRANSFORMERS_STATE_CACHE)


def _maybe_use_state_cache(model, arguments: dict) -> None:
    """After transformers prepared generate()'s cache: swap a fresh default DynamicCache for a state cache."""
    from transformers.cache_utils import DynamicCache

    from .cache import TaylorStateCache, layer_types_are_full

    config = model.config
    text_config = config.get_text_config(decoder=True)
    spec = registered_spec(getattr(text_config, "_attn_implementation", None))
    if spec is None or not spec.state_cache or getattr(config, "is_encoder_decoder", False):
        return
    generation_config = arguments.get("generation_config")
    if generation_config is None or generation_config.cache_implementation is not None:
        return  # an explicit cache choice
    if getattr(generation_config, "is_assistant", False):
        return
    mode = arguments.get("generation_mode") or ("assisted" if arguments.get("assistant_model") is not None else "")
    if "assisted" in str(getattr(mode, "value", mode)).lower():
        return  # assisted generation crops the cache after each draft
    if not layer_types_are_full(text_config):
        return
    model_kwargs = arguments.get("model_kwargs")
    if not isinstance(model_kwargs, dict) or generation_config.use_cache is False:
        return
    names = [n for n in ("cache", "past_key_values") if model_kwargs.get(n) is not None]
    if not names:  # transformers 5.0-5.1x leave the default cache to the model's forward: give it ours
        supports = getattr(model, "_supports_default_dynamic_cache", None)
        if supports is not None and not supports():
            return
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model_kwargs[name] = TaylorStateCache(config)
        return
    cache = model_kwargs[names[0]]
    if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and cache.get_seq_length() == 0:
        model_kwargs[names[0]] = TaylorStateCache(config)


def _install_generate_hook() -> None:
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin._prepare_cache_for_generation
    if getattr(original, _HOOK_ATTRIBUTE, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _prepare_cache_for_generation(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _maybe_use_state_cache(self, signature.bind(self, *args, **kwargs).arguments)
        return result

    setattr(_prepare_cache_for_generation, _HOOK_ATTRIBUTE, True)
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation


def register(name: str = "taylor", *, kind: str = "taylor", window: Optional[int] = None, backend: str = "auto",
             state_cache: bool = True) -> str:
    """Register an attention implementation with transformers under ``name``; returns ``name`` (pass it as
    ``attn_implementation``).

    ``kind="taylor"``: second-order Taylor attention. ``kind="hybrid"``: exact softmax weights over the last
    ``window`` keys (default 64), the Taylor weight beyond them, one normalizer.
    ``backend``: the kernels' backend ("auto", "cpu", "reference", ...).
    ``state_cache``: on transformers >= 5.0, ``generate()`` of a model using this attention decodes with a
    fixed-size state (:class:`TaylorStateCache`) unless the call chooses a cache itself; False keeps transformers'
    key/value cache (each token then costs O(context) per head, as softmax's).

    Registers the attention function with ``AttentionInterface`` and transformers' flash-attention mask function
    (a 2-D padding mask, or None) with ``AttentionMaskInterface`` under the same name.
    """
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as exc:
        raise ImportError(
            f"linattn_cuda.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}: "
            f'pip install -e ".[transformers]" ({exc})'
        ) from exc
    if version_tuple(transformers.__version__) < version_tuple(MIN_TRANSFORMERS):
        raise ImportError(
            f"linattn_cuda.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}, "
            f"found {transformers.__version__}"
        )
    if kind == "hybrid" and window is None:
        window = 64
    spec = AttentionSpec(name, kind, window, backend, bool(state_cache))

    def forward(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(spec, module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    _REGISTRY[name] = spec
    if spec.state_cache and state_cache_supported():
        _install_generate_hook()
    return name
