"""Stage entry points: each reads params.yaml, calls the library and writes its outputs."""
