"""Bridges to other frameworks. Each submodule imports its framework only when it is imported:

* :mod:`personacore.integrations.torch` — steering hooks on a ``transformers`` model for training
  (preventative steering) and CAFT-style ablation (extra ``personacore[torch]``).
"""
