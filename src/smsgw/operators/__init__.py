"""Connectors to real operators' protocols: each one a `Provider` the engine sends through."""

from smsgw.operators.http import HttpOperator

__all__ = ["HttpOperator"]
