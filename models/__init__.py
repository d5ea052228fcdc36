"""Model families (Llama, GLA), attention backends and kernels.

Owns the network definitions and the per-family spec (class, FLOPs per token, TP plan, HF
converter). Knows nothing of training loops, data or launchers.
"""
