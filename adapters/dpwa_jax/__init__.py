"""dpwa adapter for JAX pytrees, including flax.linen parameter dicts."""
