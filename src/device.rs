//! Which compute devices this build and machine can use.

/// Ok when a CUDA device can be used, else the reason it cannot (see
/// `backend::cuda::cuda_available`, which also knows ZOFT_CUDA_EMULATOR).
pub fn cuda_status() -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        crate::backend::cuda::cuda_available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this build has no CUDA support (built without the `cuda` feature)".into())
    }
}
