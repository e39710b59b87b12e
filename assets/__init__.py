"""Dagster assets of the AFMRL pipeline, one module per stage (installed as ``afmrl_dagster.assets``)."""
