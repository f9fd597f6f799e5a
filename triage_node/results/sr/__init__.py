"""Structured Report results: TID 1500 measurement reports (PS3.16 A.35)."""

from triage_node.results.sr.encoder import SrEncoder

__all__ = ["SrEncoder"]
