//! The FP8 KV cache (issue 14) for the ETAP kernel of 16 columns: the cache's rows stay FP8 in
//! global memory (656 or 576 bytes a row against 1152) and become bf16 tiles in shared memory,
//! so that the consumers, the tensor cores and the arithmetic are the 16-bit kernel's.
//!
//! ```text
//!   producer thread:   raw tile (64 rows x row_bytes, one TMA box) -> staging    [raw_full]
//!   converter warps:   staging -> bf16 tile of the ring (swizzled), x scale     [full[s]]
//!   consumers:         the 16-bit ETAP kernel's tile step, unchanged            [empty[s]]
//! ```
//!
//! The producer warpgroup's three idle warps are the converters (after their empty requests
//! and stale splits): they wait for the raw tile and for a free stage of the ring, convert, fence
//! their writes for the tensor cores (`fence.proxy.async`) and arrive on the stage's `full`
//! barrier (counting [`CONVERTERS`] arrivals) and on `raw_empty`, after which the producer loads
//! the next raw tile. One staging buffer: the 16-bit kernel's two stages and it fit in 211 KiB.
//!
//! Formats (`etap_core::contract::FP8_*_ROW_BYTES`, host/src/fp8.rs): FlashMLA's 656 bytes (512
//! e4m3, 4 f32 scales, one per 128 values, 64 bf16 for RoPE; pages 65 rows apart) and per-tensor
//! e4m3 (576 e4m3, `DecodeParams::kv_scale`). Pages of 64 rows only. The value is e4m3 x scale
//! in f32, rounded once to bf16 (exact for the 656 format's power-of-two scales).
use super::{
    for_each_producer_tile, kv_on_m, prologue, DecodeParams, Smem, CONSUMERS, CONSUMER_REGS, PRODUCER_REGS, STAGES,
    THREADS,
};
use crate::barriers::IDLE as BAR_IDLE;
use crate::device::{index, math, mbarrier, smem, sync, tma};
use crate::elem::Bf16;
use crate::merge;
use crate::tile::{self, BLOCK_BYTES, ROW_BYTES, TILE_BYTES};
use etap_core::contract::{fp8_staging_offset, FP8_656_ROW_BYTES, FP8_TENSOR_ROW_BYTES};
use etap_core::{WorkRange, D_QK, D_V, QK_BLOCKS, TILE_ROWS};

/// The converter threads: the producer warpgroup's warps 1 to 3.
pub const CONVERTERS: u32 = 3 * index::WARP;
/// Columns of the kernel's CTA (two warpgroups of 8).
const COLS: u32 = 16;
/// 16-byte chunks (8 bf16) of a tile row: 576 / 8.
const ROW_CHUNKS: u32 = D_QK as u32 / 8;

#[inline(always)]
unsafe fn decode_fp8<const ROW: u32>(prm: &DecodeParams) {
    let sm = Smem::new(COLS, COLS / 2);
    let staging = smem::base() + fp8_staging_offset();
    let raw_full = staging + TILE_ROWS as u32 * ROW;
    let raw_empty = raw_full + 8;
    let group = index::block_y();
    let t = index::thread_x();
    if t == 0 {
        // Initialized here, fenced and synchronized by the prologue with the ring's.
        mbarrier::init(raw_full, 1);
        mbarrier::init(raw_empty, CONVERTERS);
    }
    match prologue::<STAGES, CONVERTERS>(prm, &sm) {
        Some(range) => {
            if sync::warp_uniform(t / index::WARPGROUP) == CONSUMERS {
                sync::setmaxnreg_dec::<PRODUCER_REGS>();
                let first_conv = CONSUMERS * index::WARPGROUP + index::WARP;
                if t == CONSUMERS * index::WARPGROUP {
                    produce_raw::<ROW>(prm, &range, &sm, group, staging, raw_full, raw_empty);
                } else if t >= first_conv {
                    let rank = t - first_conv;
                    merge::write_empty(prm, group, COLS, rank, CONVERTERS);
                    merge::publish_empty_splits(prm, group, COLS, rank, CONVERTERS, BAR_IDLE);
                    convert::<ROW>(prm, &range, &sm, staging, raw_full, raw_empty, rank);
                }
            } else {
                sync::setmaxnreg_inc::<CONSUMER_REGS>();
                kv_on_m::consume::<8, Bf16>(prm, &range, &sm, group);
            }
        }
        None => merge::write_empty(prm, group, COLS, t, THREADS),
    }
}

/// The producer thread: each request's Q, then each tile's raw rows (one box of 64 rows of
/// `ROW` bytes, from the page the block table names, or zeros for an entry outside the cache)
/// into the staging buffer once the converters are done with the previous tile's.
///
/// # Safety
/// One thread, after the prologue; the KV tensor map has boxes of 64 raw rows.
#[inline(always)]
unsafe fn produce_raw<const ROW: u32>(
    prm: &DecodeParams,
    range: &WorkRange,
    sm: &Smem,
    group: u32,
    staging: u32,
    raw_full: u32,
    raw_empty: u32,
) {
    for_each_producer_tile!(prm, range, sm, group, COLS, |_r, _, table, tile, it| {
        // Pages of 64 rows: tile `tile` is page slot `tile`, below `max_pages`.
        let id = *table.add(tile as usize);
        if it > 0 {
            tile::wait(raw_empty, (it - 1) & 1);
        }
        mbarrier::arrive_expect_tx(raw_full, TILE_ROWS as u32 * ROW);
        tma::load_2d(prm.kv_map, staging, raw_full, 0, prm.page_row(id, 0, prm.kv_stride));
    });
}

/// The converters: for each tile of the part, the raw rows in the staging buffer to the bf16
/// tile of the ring, in the 128-byte-swizzled layout the consumers read. `rank` of
/// [`CONVERTERS`].
///
/// # Safety
/// The converter threads, after the prologue.
#[inline(always)]
unsafe fn convert<const ROW: u32>(
    prm: &DecodeParams,
    range: &WorkRange,
    sm: &Smem,
    staging: u32,
    raw_full: u32,
    raw_empty: u32,
    rank: u32,
) {
    let mut it = 0u32;
    for r in range.begin_req..=range.end_req {
        let (_, lo, hi) = prm.segment(range, r);
        for _ in lo..hi {
            let stage = it % STAGES;
            tile::wait(raw_full, it & 1);
            if it >= STAGES {
                tile::wait(sm.empty + 8 * stage, (it / STAGES - 1) & 1);
            }
            let dst = sm.pages + stage * TILE_BYTES;
            let mut i = rank;
            while i < TILE_ROWS as u32 * ROW_CHUNKS {
                let row = i / ROW_CHUNKS;
                let block = (i % ROW_CHUNKS) / 8;
                let chunk = i % 8;
                let src = staging + row * ROW;
                let v = if ROW == FP8_656_ROW_BYTES && block == (D_V / 64) as u32 {
                    // The 656-byte format's RoPE part is bf16 already.
                    smem::ld_v4_u32(src + D_V as u32 + 16 + chunk * 16)
                } else {
                    let scale = if ROW == FP8_656_ROW_BYTES {
                        // One f32 scale per 128 values, after the 512 e4m3.
                        smem::ld_f32(src + D_V as u32 + 4 * (block / 2))
                    } else {
                        prm.kv_scale
                    };
                    dequant8(smem::ld_v2_u32(src + block * 64 + chunk * 8), scale)
                };
                let at = dst + block * BLOCK_BYTES + row * ROW_BYTES + ((chunk ^ (row % 8)) * 16);
                smem::st_v4_u32(at, v);
                i += CONVERTERS;
            }
            // The tile's writes, for the tensor cores; then the staging buffer is free and the
            // stage full.
            sync::fence_proxy_async_shared();
            mbarrier::arrive(raw_empty);
            mbarrier::arrive(sm.full + 8 * stage);
            it += 1;
        }
    }
}

/// Eight e4m3 (`x`: four a word, the first in the low byte) times `scale`, as eight bf16 in
/// four words (the first in the low half).
#[inline(always)]
fn dequant8(x: [u32; 2], scale: f32) -> [u32; 4] {
    let mut v = [0u32; 4];
    for (w, &word) in x.iter().enumerate() {
        for h in 0..2 {
            let (a, b) = math::e4m3x2_to_f32((word >> (16 * h)) as u16);
            v[2 * w + h] = math::pack2::<Bf16>(a * scale, b * scale);
        }
    }
    v
}

/// The rows of the two formats, checked against the kernel's layout arithmetic.
const _: () =
    assert!(FP8_656_ROW_BYTES as usize == D_V + 16 + 2 * (D_QK - D_V) && FP8_TENSOR_ROW_BYTES as usize == D_QK);
const _: () = assert!(QK_BLOCKS == 9 && ROW_CHUNKS == 72);

macro_rules! decode_fp8_entry {
    ($($name:ident = $row:expr;)*) => {$(
        /// ETAP split-KV decode of 16 columns over an FP8 cache; see the module documentation.
        /// Launch: grid (parts, column groups), [`THREADS`] threads,
        /// `etap_core::contract::fp8_smem_bytes` bytes.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(params: DecodeParams) {
            decode_fp8::<{ $row }>(&params)
        }
    )*};
}

decode_fp8_entry! {
    etap_decode_fp8_656_c16 = FP8_656_ROW_BYTES;
    etap_decode_fp8_tensor_c16 = FP8_TENSOR_ROW_BYTES;
}
