"""Framework-neutral runtime helpers shared by both trainers (no jax or torch imports here)."""
