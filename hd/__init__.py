"""hd: Hierarchical Distillation of a flow-matching teacher into a one-step generator (method: docs/method.md)."""

from hd import runtime_env as _runtime_env

# Before anything imports JAX's backends or TensorFlow: every entry point imports this package first.
_runtime_env.apply_defaults()
