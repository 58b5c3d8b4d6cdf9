"""Fused GPU implementations behind :mod:`megatrain.model.kernels`.

- :mod:`megatrain.kernels.triton_kernels`: the Triton kernels (imported only where Triton exists).
- :mod:`megatrain.kernels.ops`: autograd wrappers for RMSNorm, SwiGLU and RoPE.
- :mod:`megatrain.kernels.linear_ce`: the chunked output head + cross-entropy (vocab-parallel).

Nothing here is imported by the model directly: ``megatrain.model.kernels.configure_kernels``
selects these at start-up, and the references there stay the CPU path and the tests' oracle.
"""
