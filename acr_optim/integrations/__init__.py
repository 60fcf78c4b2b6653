"""Integrations with training frameworks; each submodule imports its framework lazily (``acr_optim.integrations.hf``)."""
