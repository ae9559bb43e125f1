//! Tile-GEMM test kernels: C[64 x N] = A[64 x 576] · B[576 x N] through the same TMA loads,
//! 128-byte-swizzled shared layouts and wgmma descriptors the decode kernel uses.
//!
//! B is given as B^T [N x 576] (K-major, like Q). A is given either as A [64 x 576] (K-major,
//! like K in S^T = K·Q^T) or as A^T [576 x 64] (M-major, like V^T in O^T = V^T·P^T, where the
//! cache tile's rows are the K dimension). One warpgroup; one mbarrier; one commit group.
use crate::device::{index, mbarrier, smem, sync, tma, tma::TensorMap, wgmma};
use crate::elem::{Bf16, Elem, F16};
use etap_core::{BLOCK_COLS, D_QK, QK_BLOCKS};

/// Bytes of one 64 x 64 block of 16-bit elements: one TMA box, eight swizzle atoms.
const BLOCK_BYTES: u32 = (64 * BLOCK_COLS * 2) as u32;
/// wgmma K per instruction for 16-bit operands.
const K_STEP: usize = 16;
/// K steps per 64-wide block: the 128-byte swizzle row holds four 32-byte K steps.
const STEPS_PER_BLOCK: usize = BLOCK_COLS / K_STEP;

/// The kernel body; `TA` = 1 when A arrives as A^T (M-major).
#[inline(always)]
unsafe fn tile_gemm<const N: usize, const TA: u32, E: Elem>(
    a_map: *const TensorMap,
    b_map: *const TensorMap,
    c: *mut f32,
) {
    let t = index::thread_x();
    let a_tile = smem::base();
    let b_tile = a_tile + QK_BLOCKS as u32 * BLOCK_BYTES;
    let b_block_bytes = (N * 128) as u32;
    let bar = b_tile + QK_BLOCKS as u32 * b_block_bytes;
    #[allow(clippy::manual_is_multiple_of)] // the GPU-tested PTX; `is_multiple_of` lays out the branch differently
    if a_tile % 1024 != 0 {
        sync::trap();
    }
    if t == 0 {
        tma::acquire_map(a_map);
        tma::acquire_map(b_map);
        mbarrier::init(bar, 1);
        sync::fence_mbarrier_init();
    }
    sync::sync_threads();
    if t == 0 {
        let bytes = QK_BLOCKS as u32 * (BLOCK_BYTES + b_block_bytes);
        mbarrier::arrive_expect_tx(bar, bytes);
        for blk in 0..QK_BLOCKS as i32 {
            if TA == 0 {
                // A [64 x 576]: block `blk` is columns 64*blk.. of all 64 rows.
                tma::load_2d(a_map, a_tile + blk as u32 * BLOCK_BYTES, bar, 64 * blk, 0);
            } else {
                // A^T [576 x 64]: block `blk` is rows 64*blk.. (K) of all 64 columns (M).
                tma::load_2d(a_map, a_tile + blk as u32 * BLOCK_BYTES, bar, 0, 64 * blk);
            }
            tma::load_2d(b_map, b_tile + blk as u32 * b_block_bytes, bar, 64 * blk, 0);
        }
    }
    mbarrier::wait(bar, 0);

    let mut acc = [0f32; 32];
    wgmma::fence();
    for kk in 0..D_QK / K_STEP {
        let blk = (kk / STEPS_PER_BLOCK) as u32;
        let within = (kk % STEPS_PER_BLOCK) as u32 * 32;
        let a = if TA == 0 {
            wgmma::Desc::k_major_sw128(a_tile + blk * BLOCK_BYTES + within)
        } else {
            // 16 K rows of 128 bytes per step.
            wgmma::Desc::m_major_sw128(a_tile + kk as u32 * (K_STEP as u32 * 128))
        };
        let b = wgmma::Desc::k_major_sw128(b_tile + blk * b_block_bytes + within);
        wgmma::mma::<N, TA, 0, E>(&mut acc, a, b, kk > 0);
    }
    wgmma::commit_group();
    wgmma::wait_group::<0>();

    #[allow(clippy::needless_range_loop)] // i is also the fragment position
    for i in 0..N / 2 {
        let (row, col) = wgmma::frag_pos(t, i as u32);
        *c.add(row as usize * N + col as usize) = acc[i];
    }
}

macro_rules! tile_gemm_entry {
    ($($name:ident = ($n:literal, $ta:literal, $e:ty);)*) => {$(
        /// Test kernel: see the module documentation. Launch with 128 threads and
        /// `9 * (8192 + 128 * N) + 8` bytes of dynamic shared memory.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(a_map: *const TensorMap, b_map: *const TensorMap, c: *mut f32) {
            tile_gemm::<$n, $ta, $e>(a_map, b_map, c)
        }
    )*};
}

tile_gemm_entry! {
    etap_test_gemm_bf16_k_n8 = (8, 0, Bf16);
    etap_test_gemm_bf16_k_n16 = (16, 0, Bf16);
    etap_test_gemm_bf16_k_n32 = (32, 0, Bf16);
    etap_test_gemm_bf16_k_n64 = (64, 0, Bf16);
    etap_test_gemm_bf16_m_n8 = (8, 1, Bf16);
    etap_test_gemm_bf16_m_n16 = (16, 1, Bf16);
    etap_test_gemm_bf16_m_n32 = (32, 1, Bf16);
    etap_test_gemm_bf16_m_n64 = (64, 1, Bf16);
    etap_test_gemm_f16_k_n8 = (8, 0, F16);
    etap_test_gemm_f16_k_n16 = (16, 0, F16);
    etap_test_gemm_f16_k_n32 = (32, 0, F16);
    etap_test_gemm_f16_k_n64 = (64, 0, F16);
    etap_test_gemm_f16_m_n8 = (8, 1, F16);
    etap_test_gemm_f16_m_n16 = (16, 1, F16);
    etap_test_gemm_f16_m_n32 = (32, 1, F16);
    etap_test_gemm_f16_m_n64 = (64, 1, F16);
}
