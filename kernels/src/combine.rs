//! The combine kernel: merges the splits of each (request, column) by their lse.
//!
//! For a request with `k > 1` splits, column `n`: lse = log Σ_i exp(lse_i) and
//! out = Σ_i exp(lse_i - lse) · O_i, where O_i is split i's output normalized by its own sum.
//! A request with one split was written by the decode kernel directly and is skipped; a request
//! with no rows gets out = 0 and lse = -inf. One CTA per (request, column): 4 groups of 128
//! threads take the splits round-robin, 4 loads in flight each, and add up through shared
//! memory at the end.
use crate::device::{index, math, smem, sync};
use etap_core::D_V;

/// Parameters of [`etap_combine_bf16`] / [`etap_combine_f16`].
#[repr(C)]
pub struct CombineParams {
    pub split_offsets: *const u32,
    pub o_accum: *const f32,
    pub lse_accum: *const f32,
    pub out: *mut u16,
    pub lse: *mut f32,
    pub batch: u32,
    pub s_q: u32,
    pub h_q: u32,
    pub _pad: u32,
}

/// Threads per CTA: [`GROUPS`] groups of 128, each thread of a group owning 4 of the 512
/// features (one 16-byte load per split).
pub const THREADS: u32 = GROUPS * GROUP;
/// Groups of a CTA: they take the splits round-robin, so that a request cut into many splits
/// (one long request spread over every SM) is merged by many loads in flight at once.
pub const GROUPS: u32 = 4;
const GROUP: u32 = (D_V / 4) as u32;
/// Splits whose loads one thread issues before using any of them.
const UNROLL: u32 = 4;

/// Block-wide max over THREADS threads, through `scratch` (THREADS / 32 floats).
#[inline(always)]
unsafe fn block_max(x: f32, scratch: u32) -> f32 {
    let mut v = x;
    for m in [16u32, 8, 4, 2, 1] {
        v = math::fmax(v, sync::shfl_xor_f32(v, m));
    }
    let warp = index::warp();
    if index::lane() == 0 {
        smem::st_f32(scratch + warp * 4, v);
    }
    sync::sync_threads();
    let mut r = f32::NEG_INFINITY;
    for w in 0..THREADS / 32 {
        r = math::fmax(r, smem::ld_f32(scratch + w * 4));
    }
    r
}

/// One CTA per (request, column).
#[inline(always)]
unsafe fn combine<const F16: bool>(p: &CombineParams) {
    // Launched as the decode kernel's programmatic dependent: wait for its partial results.
    sync::wait_prerequisites();
    let r = index::block_x();
    let n = index::block_y();
    let n_req = p.s_q * p.h_q;
    if r >= p.batch || n >= n_req {
        return;
    }
    let first = *p.split_offsets.add(r as usize);
    let splits = *p.split_offsets.add(r as usize + 1) - first;
    if splits == 1 {
        // Written by the decode kernel.
        return;
    }
    let t = index::thread_x();
    let g = t / GROUP;
    let lt = t % GROUP;
    let (tok, head) = (n / p.h_q, n % p.h_q);
    let base = smem::base();
    // Max lse over the splits (-inf when there are none).
    let mut m = f32::NEG_INFINITY;
    let mut i = t;
    while i < splits {
        m = math::fmax(m, *p.lse_accum.add(((first + i) * n_req + n) as usize));
        i += THREADS;
    }
    let m = block_max(m, base);
    // Each group sums its splits' weighted outputs for its thread's 4 features.
    let mut acc = [0f32; 4];
    let mut total = 0f32;
    if m != f32::NEG_INFINITY {
        let mut i = g;
        while i < splits {
            let mut w = [0f32; UNROLL as usize];
            let mut x = [[0f32; 4]; UNROLL as usize];
            for u in 0..UNROLL {
                let k = i + u * GROUPS;
                if k < splits {
                    let slot = first + k;
                    w[u as usize] = *p.lse_accum.add((slot * n_req + n) as usize);
                    x[u as usize] =
                        *(p.o_accum.add(((slot * n_req + n) as usize) * D_V) as *const [f32; 4]).add(lt as usize);
                } else {
                    w[u as usize] = f32::NEG_INFINITY;
                }
            }
            for u in 0..UNROLL as usize {
                let wu = math::exp2((w[u] - m) * core::f32::consts::LOG2_E);
                total += wu;
                for d in 0..4 {
                    acc[d] += wu * x[u][d];
                }
            }
            i += UNROLL * GROUPS;
        }
    }
    // Add the groups' partial sums: groups 1.. write theirs, group 0 adds them.
    let part = base + 64; // after the max scratch
    sync::sync_threads();
    if g > 0 {
        let a = part + ((g - 1) * GROUP + lt) * 20;
        for d in 0..4u32 {
            smem::st_f32(a + d * 4, acc[d as usize]);
        }
        smem::st_f32(a + 16, total);
    }
    sync::sync_threads();
    if g != 0 {
        return;
    }
    for h in 1..GROUPS {
        let a = part + ((h - 1) * GROUP + lt) * 20;
        for d in 0..4u32 {
            acc[d as usize] += smem::ld_f32(a + d * 4);
        }
        total += smem::ld_f32(a + 16);
    }
    let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
    let out = p.out.add(((r * n_req + n) as usize) * D_V) as *mut [u32; 2];
    *out.add(lt as usize) = [
        math::pack2::<F16>(acc[0] * inv, acc[1] * inv),
        math::pack2::<F16>(acc[2] * inv, acc[3] * inv),
    ];
    if lt == 0 {
        let lse = if total > 0.0 {
            m + math::ln(total)
        } else {
            f32::NEG_INFINITY
        };
        *p.lse.add(((r * p.h_q + head) * p.s_q + tok) as usize) = lse;
    }
}

/// Dynamic shared memory of the combine kernel: the max scratch (64 bytes) and the partial
/// sums of groups 1.. (4 features + 1 weight sum per thread).
pub const SMEM_BYTES: u32 = 64 + (GROUPS - 1) * GROUP * 20;

/// Combine for bf16 outputs. Launch: grid (b, s_q * h_q), [`THREADS`] threads, [`SMEM_BYTES`].
#[no_mangle]
pub unsafe extern "ptx-kernel" fn etap_combine_bf16(params: CombineParams) {
    combine::<false>(&params)
}

/// Combine for fp16 outputs. Launch: grid (b, s_q * h_q), [`THREADS`] threads, [`SMEM_BYTES`].
#[no_mangle]
pub unsafe extern "ptx-kernel" fn etap_combine_f16(params: CombineParams) {
    combine::<true>(&params)
}
