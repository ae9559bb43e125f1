//! The FP8 KV cache on the wide (heads-on-M) kernel, for requests of more than 32 (token, head)
//! columns (issue 14's compute-bound shapes: DeepSeek's h128, s_q 2 x h64): the wide kernel's
//! layout, consumers and split merge (`heads_on_m`), each page converted once for 64 columns
//! where the ETAP FP8 kernel converts it once for each 32.
//!
//! ```text
//!   producer warp 0, thread 0:  each request's Q (TMA)                               [q_full]
//!   converters (warps 1-3):     each tile's 64 raw rows, global memory -> registers ->
//!                               the f16 tile of the ring (x block scale)              [full[s]]
//!                               (their first thread: the copy engine's L2 prefetch of
//!                               the tiles PREFETCH_TILES ahead)
//!   consumers:                  the wide kernel's: S = Q·K^T, row softmax, O += P·V   [empty[s]]
//! ```
//!
//! Why no staging ring in shared memory, as the ETAP FP8 kernel has: Q takes 64 rows here
//! (72 KiB), so beside the two f16 tile buffers there is no room for raw boxes (one tile buffer
//! and a ring was session 13's wide FP8 kernel: converting and consuming then took turns, 1.17x
//! the bf16 cache at h128 64K, H100). The converters read the cache's rows from global memory
//! themselves (`DecodeParams::kv`), one or two rows of loads in flight a thread, with the
//! copy engine prefetching the next tiles into L2 so that those loads hit there. It also spares
//! shared memory the raw bytes' write and read.
//!
//! Values as in `fp8` (exact conversions to f16; the per-tensor scale folded by the consumers).
//! A block-table entry outside the cache gives a tile of zeros, as the copy engine gives the
//! other kernels: the converters load nothing for it.
use super::fp8::{e4m3x8_to_f16, is_rope};
use super::{for_each_producer_tile, heads_on_m, prologue, DecodeParams, Smem, CONSUMERS, ENTRY_REGS, STAGES, THREADS};
use crate::barriers::IDLE as BAR_IDLE;
use crate::device::{global, index, math, mbarrier, smem, sync, tma};
use crate::elem::{Elem, Fp8Blocks, Fp8Tensor};
use crate::merge;
use crate::tile::{self, BLOCK_BYTES, ROW_BYTES, TILE_BYTES, WIDE_ROWS};
use etap_core::contract::{FP8_656_ROW_BYTES, FP8_BOX_ROWS, FP8_TENSOR_ROW_BYTES, FP8_WIDE_CONVERTERS as CONVERTERS};
use etap_core::{WorkRange, D_QK, D_V, TILE_ROWS};

/// The first converter thread: the producer warpgroup's second warp.
const FIRST_CONVERTER: u32 = CONSUMERS * index::WARPGROUP + index::WARP;
const _: () = assert!(THREADS - FIRST_CONVERTER == CONVERTERS);
/// Registers of the converters (the producer warpgroup) and the consumers: the converters'
/// loads in flight and their addresses take more than the 16-bit producer's 40 (ptxas spilled
/// them there), and the wide consumers keep no spill at 224.
const CONVERTER_REGS: u32 = 56;
const WIDE_FP8_CONSUMER_REGS: u32 = 224;
const _: () = assert!(
    (ENTRY_REGS - CONVERTER_REGS) * index::WARPGROUP
        >= (WIDE_FP8_CONSUMER_REGS - ENTRY_REGS) * CONSUMERS * index::WARPGROUP,
    "the consumers would take more registers than the converters give back"
);
/// Tiles ahead of the one being converted that the copy engine brings into L2: two tiles of
/// every CTA (84 KiB each at 656 bytes a row, 11 MiB over 132 SMs) stay well inside the L2.
const PREFETCH_TILES: u32 = 2;
/// 16-byte f16 chunks (8 values) of a tile row, [`CHUNK_LANES`] threads a row, three chunks
/// each (`c`, `c + 24`, `c + 48`), [`ROW_LANES`] rows at a time: the ETAP FP8 kernel's chunk
/// layout, so that each thread's source offsets, scales and swizzle stay fixed and only the row
/// moves.
const ROW_CHUNKS: u32 = D_QK as u32 / 8;
const CHUNK_LANES: u32 = ROW_CHUNKS / 3;
const ROW_LANES: u32 = CONVERTERS / CHUNK_LANES;
/// Rows a converter has in flight for rows of `ROW` bytes, all their loads issued before any
/// conversion: the bytes in flight (96 threads x 48 bytes at two rows of the per-tensor format,
/// 4.5 KiB an SM; x 24-32 bytes and three scales at one of the 656-byte format) are what hides
/// the L2's latency, and the registers are the producer warpgroup's [`CONVERTER_REGS`] (ptxas
/// spilled two rows of the 656-byte format there).
const fn rows_in_flight(row: u32) -> u32 {
    if row == FP8_656_ROW_BYTES {
        1
    } else {
        2
    }
}
const _: () = assert!(
    CHUNK_LANES * ROW_LANES == CONVERTERS
        && (TILE_ROWS as u32).is_multiple_of(ROW_LANES * rows_in_flight(FP8_656_ROW_BYTES))
        && (TILE_ROWS as u32).is_multiple_of(ROW_LANES * rows_in_flight(FP8_TENSOR_ROW_BYTES))
        && 3 * rows_in_flight(FP8_TENSOR_ROW_BYTES) <= 8
);

#[inline(always)]
unsafe fn decode_fp8_wide<const ROW: u32, E: Elem>(prm: &DecodeParams) {
    let (sm, red_sum) = heads_on_m::layout();
    let group = index::group();
    let t = index::thread_x();
    match prologue::<STAGES, CONVERTERS>(prm, &sm) {
        Some(range) => {
            if sync::warp_uniform(t / index::WARPGROUP) == CONSUMERS {
                sync::setmaxnreg_dec::<CONVERTER_REGS>();
                if t == CONSUMERS * index::WARPGROUP {
                    // Q only: the converters load the pages.
                    for_each_producer_tile!(prm, &range, &sm, group, WIDE_ROWS, |_r, _, _, _tile, _it| {});
                } else if t >= FIRST_CONVERTER {
                    let rank = t - FIRST_CONVERTER;
                    merge::write_empty(prm, group, WIDE_ROWS, rank, CONVERTERS);
                    merge::publish_empty_splits(prm, group, WIDE_ROWS, rank, CONVERTERS, BAR_IDLE);
                    // The work range read again rather than kept from the prologue: live across
                    // the hand-over it took three of the converters' registers (ptxas spilled
                    // them), and the load is an L1 hit.
                    let range = core::ptr::read_volatile(prm.ranges.add(index::part() as usize));
                    convert::<ROW>(prm, &range, &sm, rank);
                }
            } else {
                sync::setmaxnreg_inc::<WIDE_FP8_CONSUMER_REGS>();
                heads_on_m::consume::<E>(prm, &range, &sm, red_sum, group);
            }
        }
        None => merge::write_empty(prm, group, WIDE_ROWS, t, THREADS),
    }
}

/// Ask the copy engine to bring page `id`'s rows (one tile: pages of 64 rows) into L2, in the
/// tensor map's boxes of [`FP8_BOX_ROWS`] rows. An entry outside the cache maps past it: nothing
/// is read.
///
/// # Safety
/// One thread, after the prologue (the map acquired).
#[inline(always)]
unsafe fn prefetch_tile(prm: &DecodeParams, id: i32) {
    let row = prm.page_row(id, 0, prm.kv_stride);
    for half in 0..TILE_ROWS as u32 / FP8_BOX_ROWS {
        tma::prefetch_2d(prm.kv_map, 0, row + (half * FP8_BOX_ROWS) as i32);
    }
}

/// The converters: for each tile of the part, in the consumers' order, wait for its stage to be
/// free, convert this thread's share of the page's rows into it, fence the writes for the
/// tensor cores and arrive on the stage's `full` barrier (counting [`CONVERTERS`] arrivals).
/// `rank` of [`CONVERTERS`]; rank 0 also issues the L2 prefetches.
///
/// # Safety
/// The converter threads, after the prologue; `prm.kv` is the cache the tensor map describes.
#[inline(always)]
unsafe fn convert<const ROW: u32>(prm: &DecodeParams, range: &WorkRange, sm: &Smem, rank: u32) {
    let lane = ConvLane::new(rank);
    let page_bytes = (prm.kv_stride * ROW) as usize;
    let mut it = 0u32;
    for r in range.begin_req..=range.end_req {
        let (_, lo, hi) = prm.segment(range, r);
        // Pages of 64 rows: tile `tile` is page slot `tile`, below `max_pages`.
        let table = prm.block_table.add((r * prm.max_pages) as usize);
        if rank == 0 {
            let mut ahead = lo;
            while ahead < hi && ahead < lo + PREFETCH_TILES {
                prefetch_tile(prm, *table.add(ahead as usize));
                ahead += 1;
            }
        }
        for tile in lo..hi {
            if rank == 0 && tile + PREFETCH_TILES < hi {
                prefetch_tile(prm, *table.add((tile + PREFETCH_TILES) as usize));
            }
            // Read before the wait for the stage, so that its latency overlaps it.
            let id = *table.add(tile as usize);
            let stage = it % STAGES;
            if it >= STAGES {
                tile::wait(sm.empty + 8 * stage, (it / STAGES - 1) & 1);
            }
            let valid = (id as u32) < prm.num_pages;
            let page = prm.kv.add(if valid { id as usize * page_bytes } else { 0 });
            lane.convert_tile::<ROW>(page, valid, sm.pages + stage * TILE_BYTES);
            // The tile's writes, for the tensor cores; then the stage is full.
            sync::fence_proxy_async_shared();
            mbarrier::arrive(sm.full + 8 * stage);
            it += 1;
        }
    }
}

/// One converter thread's share of a tile: chunks `c`, `c + 24`, `c + 48` of rows `r0`,
/// `r0 + ROW_LANES`, ...
struct ConvLane {
    r0: u32,
    c: u32,
}

impl ConvLane {
    #[inline(always)]
    fn new(rank: u32) -> Self {
        ConvLane {
            r0: rank / CHUNK_LANES,
            c: rank % CHUNK_LANES,
        }
    }

    /// Convert this thread's share of the page at `page` (64 rows of `ROW` bytes in global
    /// memory; zeros when not `valid`, and nothing read) into the f16 tile at `dst` (shared
    /// memory, 128-byte swizzled as the copy engine lays out the 16-bit kernels' tiles).
    ///
    /// # Safety
    /// `page` is a page of the cache when `valid`; `dst` a tile buffer no one else uses now.
    #[inline(always)]
    unsafe fn convert_tile<const ROW: u32>(&self, page: *const u8, valid: bool, dst: u32) {
        let rows = rows_in_flight(ROW);
        let in_flight = 3 * rows as usize;
        for step in 0..TILE_ROWS as u32 / (ROW_LANES * rows) {
            let row0 = self.r0 + step * ROW_LANES * rows;
            // Sized for `unroll!`'s dead copies (indices up to 7); `in_flight` are used.
            let mut raw = [[0u32; 4]; 8];
            // The 656 format's block scales as f16 pairs.
            let mut scale = [0u32; 8];
            // Loads first (a warp-uniform branch: `valid` is the tile's).
            if valid {
                crate::unroll!(i < in_flight, max 8 => {
                    let row = row0 + (i as u32 / 3) * ROW_LANES;
                    let chunk = self.c + (i as u32 % 3) * CHUNK_LANES;
                    let src = page.add((row * ROW) as usize);
                    if is_rope::<ROW>(i, chunk / 8) {
                        // The 656-byte format's RoPE part, bf16 after the scales.
                        raw[i] = global::ld_nc_u32x4(src.add(D_V + 16 + (chunk as usize % 8) * 16));
                    } else {
                        let [a, b] = global::ld_nc_u32x2(src.add(chunk as usize * 8));
                        raw[i] = [a, b, 0, 0];
                        if ROW == FP8_656_ROW_BYTES {
                            // One f32 scale per 128 values (16 chunks), after the 512 e4m3.
                            let f = global::ld_nc_f32(src.add(D_V + 4 * (chunk as usize / 16)));
                            scale[i] = math::pack_f16x2(f, f);
                        }
                    }
                });
            }
            crate::unroll!(i < in_flight, max 8 => {
                let row = row0 + (i as u32 / 3) * ROW_LANES;
                let chunk = self.c + (i as u32 % 3) * CHUNK_LANES;
                let block = chunk / 8;
                let v = if is_rope::<ROW>(i, block) {
                    raw[i].map(math::bf16x2_to_f16x2)
                } else {
                    e4m3x8_to_f16([raw[i][0], raw[i][1]], ROW == FP8_656_ROW_BYTES, scale[i])
                };
                let at = dst + block * BLOCK_BYTES + row * ROW_BYTES + (((chunk % 8) ^ (row % 8)) * 16);
                smem::st_v4_u32(at, v);
            });
        }
    }
}

macro_rules! decode_fp8_wide_entry {
    ($($name:ident = ($row:expr, $e:ty);)*) => {$(
        /// Wide (heads-on-M) split-KV decode over an FP8 cache, CTAs of 64 (token, head) rows;
        /// see the module documentation. Launch: grid (column groups, parts),
        /// `decode::THREADS` threads, `heads_on_m::smem_bytes` bytes.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(params: DecodeParams) {
            decode_fp8_wide::<{ $row }, $e>(&params)
        }
    )*};
}

decode_fp8_wide_entry! {
    etap_decode_fp8_656_wide = (FP8_656_ROW_BYTES, Fp8Blocks<false>);
    etap_decode_fp8_tensor_wide = (FP8_TENSOR_ROW_BYTES, Fp8Tensor<false>);
    etap_decode_fp8_656_wide_f16 = (FP8_656_ROW_BYTES, Fp8Blocks<true>);
    etap_decode_fp8_tensor_wide_f16 = (FP8_TENSOR_ROW_BYTES, Fp8Tensor<true>);
}
