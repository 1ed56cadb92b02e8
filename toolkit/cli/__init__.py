"""The thin click CLI over the library (see main.py)."""
