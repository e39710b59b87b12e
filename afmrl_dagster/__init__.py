"""AFMRL product retrieval: the ML library by stage (``catalog``, ``attributes``, ``vlm``,
``encoders``, ``retrieval``, ``training``, ``evaluation`` and the shared modules), the Dagster
layer (``definitions``, ``assets``, ``resources``), the applications (``apps``) and the
experiments (``experiments``); the README's Architecture section draws the map, and
``pyproject.toml``'s import contracts keep it."""
