//! The forward's kernels (csrc/{convert,embed,norm,rope,attention,swiglu,logits}.cu), emulated on
//! the CPU, against the CPU backend.
