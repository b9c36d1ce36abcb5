"""cmmp-jax: CMMPNet (cross-modal message propagation for road extraction) in JAX/Flax."""
