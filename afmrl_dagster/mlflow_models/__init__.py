"""MLflow "models from code": ``encoder.py`` and ``generator.py`` are the files MLflow stores
and runs to load the pyfunc models of :mod:`afmrl_dagster.registry` (no pickles). They are
loaded by path, never imported, so this package exports nothing."""

__all__: list[str] = []
