"""JAX/Flax NNX implementation of the AuroraGPT-70B training setup.

Kept import-light: ``jax_impl.train`` must set the device count before JAX starts.
"""
