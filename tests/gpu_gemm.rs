//! On a GPU: the tile-GEMM test kernels, C[64 x N] = A[64 x 576] · B[576 x N] through TMA,
//! 128-byte-swizzled shared memory and wgmma, match a CPU product of the same 16-bit values
//! (f64 accumulation) for N in 8, 16, 32, 64, A K-major and M-major, bf16 and fp16.
use cust::launch;
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::stream::{Stream, StreamFlags};
use etap::driver::set_dynamic_smem;
use etap::gpu::decoder_or_skip;
use etap::tma::DeviceTensorMap;
use etap::{Bf16, Element, F16};
use rand::{Rng, SeedableRng};

const M: usize = 64;
const K: usize = 576;

fn run<T: Element>(dec: &etap::Decoder, dtype: &str, n: usize, m_major: bool, seed: u64) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a: Vec<T> = (0..M * K).map(|_| T::from_f32(rng.gen_range(-1.0f32..1.0))).collect();
    let bt: Vec<T> = (0..n * K).map(|_| T::from_f32(rng.gen_range(-1.0f32..1.0))).collect();
    // Reference from the rounded values, f64 accumulation.
    let mut c_ref = vec![0f64; M * n];
    for i in 0..M {
        for j in 0..n {
            let mut s = 0f64;
            for k in 0..K {
                s += a[i * K + k].to_f32() as f64 * bt[j * K + k].to_f32() as f64;
            }
            c_ref[i * n + j] = s;
        }
    }
    // A as stored for the kernel: [64 x 576] K-major, or A^T [576 x 64] M-major.
    let a_dev_host: Vec<T> = if m_major {
        let mut at = vec![T::default(); K * M];
        for i in 0..M {
            for k in 0..K {
                at[k * M + i] = a[i * K + k];
            }
        }
        at
    } else {
        a.clone()
    };
    let a_dev = DeviceBuffer::from_slice(&a_dev_host).unwrap();
    let b_dev = DeviceBuffer::from_slice(&bt).unwrap();
    let c_dev = DeviceBuffer::from_slice(&vec![f32::NAN; M * n]).unwrap();
    let a_map = if m_major {
        DeviceTensorMap::new(a_dev.as_device_ptr().as_raw(), K as u64, M as u64, 64).unwrap()
    } else {
        DeviceTensorMap::new(a_dev.as_device_ptr().as_raw(), M as u64, K as u64, 64).unwrap()
    };
    let b_map = DeviceTensorMap::new(b_dev.as_device_ptr().as_raw(), n as u64, K as u64, n as u32).unwrap();
    let name = format!("etap_test_gemm_{dtype}_{}_n{n}", if m_major { "m" } else { "k" });
    let f = dec.module().get_function(&name).unwrap();
    let smem = (9 * (8192 + 128 * n) + 8) as u32;
    set_dynamic_smem(&f, smem).unwrap();
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    unsafe {
        launch!(f<<<1, 128, smem, stream>>>(a_map.ptr(), b_map.ptr(), c_dev.as_device_ptr())).unwrap();
    }
    stream.synchronize().unwrap();
    let mut c = vec![0f32; M * n];
    c_dev.copy_to(&mut c[..]).unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for (x, r) in c.iter().zip(&c_ref) {
        assert!(x.is_finite(), "{name}: non-finite output {x} (unwritten or wrong)");
        num += (*x as f64 - r) * (*x as f64 - r);
        den += r * r;
    }
    (num / den).sqrt()
}

#[test]
fn tile_gemm_matches_cpu_for_every_n_layout_and_dtype() {
    let Some(dec) = decoder_or_skip("tile_gemm") else {
        return;
    };
    let seed0: u64 = rand::random();
    println!("seed base {seed0}");
    let mut worst = 0f64;
    for (i, n) in [8usize, 16, 32, 64].into_iter().enumerate() {
        for m_major in [false, true] {
            let e1 = run::<Bf16>(&dec, "bf16", n, m_major, seed0 + 4 * i as u64);
            let e2 = run::<F16>(&dec, "f16", n, m_major, seed0 + 4 * i as u64 + 1);
            println!(
                "n={n:2} A {}: rel err bf16 {e1:.2e}, f16 {e2:.2e}",
                if m_major { "M-major" } else { "K-major" }
            );
            assert!(
                e1 < 1e-5 && e2 < 1e-5,
                "n={n} m_major={m_major}: rel err {e1:e} / {e2:e}"
            );
            worst = worst.max(e1).max(e2);
        }
    }
    println!("tile GEMM: worst rel err {worst:.2e}");
}
