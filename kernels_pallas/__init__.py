"""Pallas kernels of bebop-jax, each beside its pure-jnp reference."""
