//! The generator's and the ZO passes' kernels (csrc/random.cu, csrc/zo.cu, lse_block of
//! csrc/logits.cu), emulated on the CPU, against their CPU twins: bit for bit, since they are
//! built only from correctly rounded operations. Inputs are fresh random values; outputs are
//! poisoned first where the kernel writes a buffer of its own.

use super::{addr, emulator, same_bits};
use crate::backend::cuda::kernels::{self, PhiloxKey};
use crate::rng::Philox;

const SEED: u64 = 0x0123_4567_89AB_CDEF;

#[test]
fn philox_words_and_normals_are_the_cpu_generators() {
    let Some(emu) = emulator() else { return };
    let key = PhiloxKey {
        seed: SEED,
        step: 9,
        tensor: 4,
    };
    let p = Philox::new(SEED, 9, 4);
    // Blocks on both sides of 2^32: the counter's high word must carry.
    let (first, n) = ((1u64 << 32) - 5, 300);
    let mut words = vec![0xDEAD_BEEFu32; 4 * n];
    kernels::philox_words(emu, addr(&words), n, key, first).unwrap();
    let want: Vec<u32> = (0..n as u64).flat_map(|b| p.block(first + b)).collect();
    assert_eq!(words, want, "Philox words");
    words.clear();

    // From an element that is not the first of its block, over a length that ends mid-block.
    let (start, n) = (3u64, 1001);
    let got = vec![f32::NAN; n];
    kernels::fill_normal(
        emu,
        addr(&got),
        crate::model::DType::F32,
        n,
        key,
        start,
        1.0,
        0.0,
    )
    .unwrap();
    let mut want = vec![0.0; n];
    p.fill_normal(start, &mut want);
    same_bits(&got, &want, "normals");
}
