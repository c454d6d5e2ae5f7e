"""The triton code generator (templates in templates/). Not yet implemented: see the backend issues."""
