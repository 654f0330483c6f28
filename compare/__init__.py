"""Loss-parity and throughput comparison of jax_impl and torch_ref runs."""
