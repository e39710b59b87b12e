"""Dagster resources and the IO manager (installed as ``afmrl_dagster.resources``)."""
