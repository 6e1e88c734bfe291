"""gmix_jax: Mixup x Sharpness-Aware Minimization in JAX.

Every training method is a composition of three independent choices
(see docs/methods.md): a mixing policy (`gmix_jax.mixing`), a sharpness rule
(`gmix_jax.sharpness`, also as Optax transforms in `gmix_jax.transforms`) and
a partition rule (`gmix_jax.partition`, driven by `gmix_jax.sensitivity`).
`gmix_jax.objectives` composes them into per-device gradient functions.
"""

__version__ = "0.1.0"
