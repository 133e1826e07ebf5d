"""Shared test machinery: tiny checkpoints, transformers references, engine invariant checks,
read gates and the 1 GB synthetic checkpoint. Test files import these; conftest.py holds the fixtures."""
