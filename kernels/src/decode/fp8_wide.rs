//! The FP8 KV cache on the wide (heads-on-M) kernel, for requests of more than 32 (token, head)
//! columns (issue 14's compute-bound shapes: DeepSeek's h128, s_q 2 x h64): the wide kernel's
//! layout, consumers and split merge (`heads_on_m`), each page converted once for 64 columns
//! where the ETAP FP8 kernel converts it once for each 32.
//!
//! ```text
//!   producer warpgroup (128 converters): each tile's 64 raw rows, global memory -> registers
//!                               -> the f16 tile of the ring (x block scale)           [full[s]]
//!                               (its first thread also: each request's Q by TMA [q_full],
//!                               and the copy engine's L2 prefetch of the tiles
//!                               PREFETCH_TILES ahead)
//!   consumers:                  the wide kernel's: S = Q·K^T, row softmax, O += P·V   [empty[s]]
//! ```
//!
//! Why no staging ring in shared memory, as the ETAP FP8 kernel has: Q takes 64 rows here
//! (72 KiB), so beside the two f16 tile buffers there is no room for raw boxes (one tile buffer
//! and a ring was session 13's wide FP8 kernel: converting and consuming then took turns, 1.17x
//! the bf16 cache at h128 64K, H100). The converters read the cache's rows from global memory
//! themselves (`DecodeParams::kv`), a whole row's share of loads in flight a thread (16 rows a
//! CTA at a time), with the copy engine prefetching the next tiles into L2 so that those loads
//! hit there. It also spares shared memory the raw bytes' write and read.
//!
//! Values as in `fp8` (exact conversions to f16; the per-tensor scale folded by the consumers).
//! A block-table entry outside the cache gives a tile of zeros, as the copy engine gives the
//! other kernels: the converters load nothing for it.
use super::fp8::e4m3x8_to_f16;
use super::{heads_on_m, load_request_q, prologue, DecodeParams, Smem, CONSUMERS, ENTRY_REGS, STAGES, THREADS};
use crate::barriers::IDLE as BAR_IDLE;
use crate::device::{global, index, math, mbarrier, smem, sync, tma};
use crate::elem::{Elem, Fp8Blocks, Fp8Tensor};
use crate::merge;
use crate::tile::{self, BLOCK_BYTES, ROW_BYTES, TILE_BYTES, WIDE_ROWS};
use etap_core::contract::{FP8_656_ROW_BYTES, FP8_BOX_ROWS, FP8_TENSOR_ROW_BYTES, FP8_WIDE_CONVERTERS as CONVERTERS};
use etap_core::{WorkRange, D_V, QK_BLOCKS, TILE_ROWS};

/// The first converter thread: the producer warpgroup's first.
const FIRST_CONVERTER: u32 = CONSUMERS * index::WARPGROUP;
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
/// Threads a row: lane `j` of a row takes its 16-byte f16 chunks (8 values) `j, j + 8, ...,
/// j + 64`, one in each of the row's [`QK_BLOCKS`] 64-value blocks. So all of a lane's chunks
/// fall in one swizzle slot (`j ^ row % 8`, and `row % 8` is fixed too, [`STEP_ROWS`] being a
/// multiple of 8), a lane needs all four of a 656-byte row's block scales (one 16-byte load),
/// and a warp's load of one block reads four rows' 64 contiguous bytes.
const CHUNK_LANES: u32 = 8;
/// Rows converted at a time, one a [`CHUNK_LANES`] threads, every load of a row's share
/// issued before any conversion: 128 threads x 72 bytes (per-tensor; 96 for the 656-byte
/// format, its scales and 16-byte RoPE chunk) = 9-12 KiB in flight a CTA, what hides the L2's
/// latency. Session 19's layout (24 threads a row, 96 converters, one or two rows) had
/// 3-4.5 KiB, and its converters bound the kernel (ncu: waiting on their loads).
const STEP_ROWS: u32 = CONVERTERS / CHUNK_LANES;
const _: () = assert!(
    CHUNK_LANES * 8 == (D_V / 8) as u32
        && STEP_ROWS.is_multiple_of(8)
        && (TILE_ROWS as u32).is_multiple_of(STEP_ROWS)
        && QK_BLOCKS == 9
);

#[inline(always)]
unsafe fn decode_fp8_wide<const ROW: u32, E: Elem>(prm: &DecodeParams) {
    let (sm, red_sum) = heads_on_m::layout();
    let group = index::group();
    let t = index::thread_x();
    match prologue::<STAGES, CONVERTERS>(prm, &sm) {
        Some(_) => {
            if sync::warp_uniform(t / index::WARPGROUP) == CONSUMERS {
                sync::setmaxnreg!(dec, CONVERTER_REGS);
                let rank = t - FIRST_CONVERTER;
                if rank >= index::WARP {
                    // The last three warps first write the CTA's empty requests and stale
                    // splits, as the 16-bit producer's idle warps do; the first warp starts on
                    // the pages at once, and its first thread on Q.
                    let (idle_rank, idle) = (rank - index::WARP, CONVERTERS - index::WARP);
                    merge::write_empty(prm, group, WIDE_ROWS, idle_rank, idle);
                    merge::publish_empty_splits(prm, group, WIDE_ROWS, idle_rank, idle, BAR_IDLE);
                }
                convert::<ROW>(prm, &sm, group, rank);
            } else {
                sync::setmaxnreg!(inc, WIDE_FP8_CONSUMER_REGS);
                // Read again, as the converters do: the prologue's copy, live across the
                // hand-over, had one of its words spilled (ptxas, 4 bytes).
                let range = core::ptr::read_volatile(prm.ranges.add(index::part() as usize));
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
/// `rank` of [`CONVERTERS`]; rank 0 also loads each request's Q (column group `group`) and
/// issues the L2 prefetches.
///
/// # Safety
/// The converter threads, after the prologue; `prm.kv` is the cache the tensor map describes.
#[inline(always)]
unsafe fn convert<const ROW: u32>(prm: &DecodeParams, sm: &Smem, group: u32, rank: u32) {
    let lane = ConvLane::new(rank);
    let page_bytes = (prm.kv_stride * ROW) as usize;
    // The work range read again, and again for each request, rather than kept from the
    // prologue: its words live across the hand-over and the tile loop took registers the
    // converters do not have (ptxas spilled them), and each load is an L1 hit.
    let range_at = prm.ranges.add(index::part() as usize);
    let WorkRange { begin_req, end_req, .. } = core::ptr::read_volatile(range_at);
    let mut it = 0u32;
    let mut q_round = 0u32;
    for r in begin_req..=end_req {
        let (_, lo, hi) = prm.segment(&core::ptr::read_volatile(range_at), r);
        // Pages of 64 rows: tile `tile` is page slot `tile`, below `max_pages`.
        let table = prm.block_table.add((r * prm.max_pages) as usize);
        if rank == 0 && lo < hi {
            let mut ahead = lo;
            while ahead < hi && ahead < lo + PREFETCH_TILES {
                prefetch_tile(prm, *table.add(ahead as usize));
                ahead += 1;
            }
            // The consumers' segments are those with tiles, each waiting for its Q. Past the
            // first, this waits until the consumers are on the previous segment's last tile
            // (`q_empty`), which the converters have filled by now.
            load_request_q(prm, sm, r, group, WIDE_ROWS, q_round);
            q_round += 1;
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

/// One converter thread's share of a tile: lane `j` of rows `r0`, `r0 + STEP_ROWS`, ...
struct ConvLane {
    r0: u32,
    j: u32,
}

impl ConvLane {
    #[inline(always)]
    fn new(rank: u32) -> Self {
        ConvLane {
            r0: rank / CHUNK_LANES,
            j: rank % CHUNK_LANES,
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
        let blocks_656 = ROW == FP8_656_ROW_BYTES;
        let j = self.j as usize;
        // The lane's swizzle slot in each of its rows (row % 8 == r0 % 8).
        let slot = dst + ((self.j ^ (self.r0 % 8)) * 16);
        for step in 0..TILE_ROWS as u32 / STEP_ROWS {
            let row = self.r0 + step * STEP_ROWS;
            let src = page.add((row * ROW) as usize);
            // The lane's e4m3 chunks of blocks 0-7 (8 bytes each), its chunk of block 8 (e4m3
            // in the per-tensor format; bf16 RoPE, 16 bytes, in the 656-byte one) and the
            // 656-byte row's four f32 block scales (one per 128 values: two blocks).
            let mut raw = [[0u32; 2]; 8];
            let mut last = [0u32; 4];
            let mut scales = [0u32; 4];
            // Loads first (a warp-uniform branch: `valid` is the tile's).
            if valid {
                crate::unroll!(k < 8, max 8 => {
                    raw[k] = global::ld_nc_u32x2(src.add((j + 8 * k) * 8));
                });
                if blocks_656 {
                    scales = global::ld_nc_u32x4(src.add(D_V));
                    last = global::ld_nc_u32x4(src.add(D_V + 16 + j * 16));
                } else {
                    let [a, b] = global::ld_nc_u32x2(src.add((j + 64) * 8));
                    last = [a, b, 0, 0];
                }
            }
            let at = slot + row * ROW_BYTES;
            crate::unroll!(k < 8, max 8 => {
                let f = f32::from_bits(scales[k / 2]);
                let v = e4m3x8_to_f16(raw[k], blocks_656, math::pack_f16x2(f, f));
                smem::st_v4_u32(at + k as u32 * BLOCK_BYTES, v);
            });
            let v = if blocks_656 {
                last.map(math::bf16x2_to_f16x2)
            } else {
                e4m3x8_to_f16([last[0], last[1]], false, 0)
            };
            smem::st_v4_u32(at + 8 * BLOCK_BYTES, v);
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
