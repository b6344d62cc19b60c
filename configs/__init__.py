"""Hydra configs installed as ``rl_attn.configs``, so ``python -m rl_attn.train`` finds them."""
