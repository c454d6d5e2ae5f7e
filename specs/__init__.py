"""The bundled spec library (installed as ``seqdsl.specs``); ``std/`` is the standard library
that specs import with ``import "std/....seq"``."""
