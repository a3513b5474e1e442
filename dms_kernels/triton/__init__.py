"""Triton kernels of DMS. On CPU they run under ``TRITON_INTERPRET=1`` (tests); on Hopper, compiled."""
