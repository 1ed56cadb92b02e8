"""Code that runs inside Triton's python backend stub: the fixed adapter and what it drives.

Everything here must import quickly with numpy only, and stay Python 3.10 compatible (the 24.10
container's stub is 3.10).
"""
