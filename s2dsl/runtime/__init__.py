"""Kernel cache, launchers, autograd and user-facing entry points."""
