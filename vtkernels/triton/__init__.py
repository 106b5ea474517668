"""Triton kernels. Each launcher validates its arguments and works on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1 (how the tests run them without a GPU)."""
