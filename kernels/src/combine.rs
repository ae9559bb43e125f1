//! The combine kernel: merges the splits of each (request, column) by their lse.
//!
//! For a request with `k > 1` splits, column `n`: lse = log Σ_i exp(lse_i) and
//! out = Σ_i exp(lse_i - lse) · O_i, where O_i is split i's output normalized by its own sum.
//! A request with one split was written by the decode kernel directly and is skipped; a request
//! with no rows gets out = 0 and lse = -inf. One warp per (request, column); each lane owns 16
//! of the 512 features.
use crate::device::{index, math};
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

/// Columns per CTA: one per warp.
pub const WARPS: u32 = 4;
/// Features per lane.
const PER_LANE: usize = D_V / 32;

#[inline(always)]
unsafe fn combine<const F16: bool>(p: &CombineParams) {
    let r = index::block_x();
    let n_req = p.s_q * p.h_q;
    let n = index::block_y() * WARPS + index::warp();
    if r >= p.batch || n >= n_req {
        return;
    }
    let lane = index::lane();
    let first = *p.split_offsets.add(r as usize);
    let splits = *p.split_offsets.add(r as usize + 1) - first;
    if splits == 1 {
        return;
    }
    let (tok, head) = (n / p.h_q, n % p.h_q);
    let out = p.out.add(((r * n_req + n) as usize) * D_V + lane as usize * PER_LANE);
    // Max lse over the splits, then the weights.
    let mut m = f32::NEG_INFINITY;
    for i in 0..splits {
        m = math::fmax(m, *p.lse_accum.add(((first + i) * n_req + n) as usize));
    }
    let mut acc = [0f32; PER_LANE];
    let mut total = 0f32;
    if m != f32::NEG_INFINITY {
        for i in 0..splits {
            let slot = first + i;
            let w = math::exp2((*p.lse_accum.add((slot * n_req + n) as usize) - m) * core::f32::consts::LOG2_E);
            total += w;
            let o = p
                .o_accum
                .add(((slot * n_req + n) as usize) * D_V + lane as usize * PER_LANE)
                as *const [f32; 4];
            for (v, a) in (0..PER_LANE / 4).zip(acc.chunks_exact_mut(4)) {
                let x = *o.add(v);
                a[0] += w * x[0];
                a[1] += w * x[1];
                a[2] += w * x[2];
                a[3] += w * x[3];
            }
        }
    }
    let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
    let words = out as *mut [u32; 4];
    for v in 0..PER_LANE / 8 {
        let e = &acc[v * 8..v * 8 + 8];
        *words.add(v) = [
            math::pack2::<F16>(e[0] * inv, e[1] * inv),
            math::pack2::<F16>(e[2] * inv, e[3] * inv),
            math::pack2::<F16>(e[4] * inv, e[5] * inv),
            math::pack2::<F16>(e[6] * inv, e[7] * inv),
        ];
    }
    if lane == 0 {
        let lse = if total > 0.0 {
            m + math::ln(total)
        } else {
            f32::NEG_INFINITY
        };
        *p.lse.add(((r * p.h_q + head) * p.s_q + tok) as usize) = lse;
    }
}

/// Combine for bf16 outputs. Launch: grid (b, ceil(s_q * h_q / 4)), 128 threads.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn etap_combine_bf16(params: CombineParams) {
    combine::<false>(&params)
}

/// Combine for fp16 outputs. Launch: grid (b, ceil(s_q * h_q / 4)), 128 threads.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn etap_combine_f16(params: CombineParams) {
    combine::<true>(&params)
}
