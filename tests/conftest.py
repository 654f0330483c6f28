"""Test process setup: JAX on CPU with 8 host devices, created before any backend starts.

Without JAX (the torch-only tier, tests/torch_stack, in a torch + DeepSpeed environment) there is
nothing to set up.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

try:
    import jax
except ModuleNotFoundError:
    jax = None

if jax is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
