"""Everything that reaches into transformers' private generation internals lives here, guarded by tests/test_seams.py."""
