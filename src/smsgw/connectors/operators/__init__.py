"""Connectors to real operators' protocols: each one a `Provider` the engine sends through."""

from smsgw.connectors.operators.http import HttpOperator

__all__ = ["HttpOperator"]
