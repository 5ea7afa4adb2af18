//! CUDA backend (kernels, allocator, cuBLAS).
