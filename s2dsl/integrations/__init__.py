"""Bridges from s2dsl to other libraries. Each submodule imports its library only when used."""
