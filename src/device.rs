//! Which compute devices this build and machine can use.

/// Ok when a CUDA device can be used, else the reason it cannot.
///
/// With ZOFT_CUDA_EMULATOR=1 the CUDA device is the kernel emulator, which runs the kernels of
/// csrc/ on the CPU (`backend::cuda::emulator`): a development aid for running the CUDA paths
/// end to end where there is no GPU. It compiles the sources of the tree zoft was built from
/// with the system C++ compiler, and it is slow.
pub fn cuda_status() -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        let emulate = std::env::var("ZOFT_CUDA_EMULATOR").is_ok_and(|v| v == "1");
        if emulate && !crate::backend::cuda::emulator::install() {
            return Err(
                "ZOFT_CUDA_EMULATOR=1, but there is no C++ compiler to build the kernel \
                        emulator with"
                    .into(),
            );
        }
        crate::backend::cuda::cuda_available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this build has no CUDA support (built without the `cuda` feature)".into())
    }
}
