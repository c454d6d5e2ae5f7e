"""Code generators, one package per target (installed as ``seqdsl.backends``).

A backend turns a lowered :class:`seqdsl.ir.graph.Program` into source code. Backends declare
their capabilities as plain attributes (see :class:`seqdsl.backends.base.Backend`); strategy choice
reads them from a table, never from model names.
"""
