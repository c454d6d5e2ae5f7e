"""The .seq grammar, shipped as package data (installed as ``seqdsl.grammar``)."""
