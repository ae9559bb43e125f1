//! The FP8 KV cache (issue 14) for the ETAP kernel of 16 or 32 columns: the cache's rows stay FP8 in
//! global memory (656 or 576 bytes a row against 1152) and become f16 tiles in shared memory,
//! so that the consumers, the tensor cores and the arithmetic are the 16-bit kernel's, in f16
//! (`elem::Fp8Blocks`, `elem::Fp8Tensor`): e4m3 goes to f16 in one exact conversion
//! (`cvt.rn.f16x2.e4m3x2`), where bf16 would take a round trip through f32. q (bf16) is
//! converted to f16 in shared memory once per request by the consumers; the output is bf16.
//!
//! ```text
//!   producer thread:   raw box (32 rows x row_bytes, half a tile) -> staging ring of 3   [raw full]
//!                      (2 at 32 columns)
//!   converter warps:   raw box -> its rows of the f16 tile of the ring (x block scale)  [raw empty]
//!                      after a tile's two boxes                                           [full[s]]
//!   consumers, c16:    warpgroup 0: the 16-bit ETAP kernel's tile step for all 16
//!                      columns (N = 16); warpgroup 1 only keeps the frame's count        [empty[s]]
//!   consumers, c32:    both warpgroups: the tile step for 16 columns each, taking turns
//!                      as in the 16-bit kernel of 32 (each tile converted once for 32)    [empty[s]]
//! ```
//!
//! The CTA has a second producer warpgroup ([`THREADS`] = 512), and the producer warpgroups'
//! warps 10 to 15 are the converters (after their empty requests and stale splits): they wait
//! for a free stage of the ring, then for each of the tile's two raw boxes, convert it and
//! arrive on its slot's `empty` barrier, after which the producer loads the box three later
//! into that slot; after the second box they fence their writes for the tensor cores
//! (`fence.proxy.async`) and arrive on the stage's `full` barrier (counting [`CONVERTERS`]
//! arrivals). Three half-tile slots are what fits beside the 16-bit kernel's layout of 16
//! columns (two beside that of 32, `contract::fp8_raw_slots`): while one box is converted the
//! copy engine fills the next two (the next one at 32 columns).
//!
//! The CTA of 32 columns (issue 14's compute-bound shapes) converts each page once for 32
//! columns, where two CTAs of 16 converted it twice; it trades the converters' second row in
//! flight (their registers go to the second computing warpgroup) and a staging slot for that.
//!
//! Formats (`etap_core::contract::FP8_*_ROW_BYTES`, host/src/fp8.rs): FlashMLA's 656 bytes (512
//! e4m3, 4 f32 scales, one per 128 values, 64 bf16 for RoPE; pages 65 rows apart) and per-tensor
//! e4m3 (576 e4m3, `DecodeParams::kv_scale`). Pages of 64 rows only.
//!
//! Values: the 656 format's e4m3 times its block's scale, both as f16 (`mul.rn.f16x2`), and its
//! RoPE part from bf16 to f16; per-tensor e4m3 as stored, its scale folded into the scores'
//! scale and the output's normalizer (exact). Exact for FlashMLA's power-of-two scales while
//! the values stay in f16's range: q, the RoPE part and the dequantized values below 65520 in
//! magnitude (beyond, infinite: a NaN output); a block scale below 2^-24 (its block below
//! about 1.3e-5) reads as zero; values under 2^-14 keep f16's subnormal steps of 2^-24.
use super::{for_each_producer_tile, kv_on_m, prologue, DecodeParams, Smem, CONSUMERS, STAGES};
use crate::barriers::IDLE as BAR_IDLE;
use crate::device::{index, math, mbarrier, smem, sync, tma};
use crate::elem::{Elem, Fp8Blocks, Fp8Tensor};
use crate::merge;
use crate::tile::{self, BLOCK_BYTES, ROW_BYTES, TILE_BYTES};
use etap_core::contract::{
    fp8_raw_slots, fp8_staging_offset, Kernel, FP8_656_ROW_BYTES, FP8_BOX_ROWS, FP8_TENSOR_ROW_BYTES,
    FP8_THREADS as THREADS, KV_ON_M_COLS,
};
use etap_core::{WorkRange, D_QK, D_V, QK_BLOCKS, TILE_ROWS};

/// The warpgroups after the consumers: the producer's (its first warp issues the loads, its
/// thread 0) and a second one, both converters but for [`FIRST_CONVERTER`]'s warps before.
const PRODUCER_WARPGROUPS: u32 = THREADS / index::WARPGROUP - CONSUMERS;
/// The first converter thread: the producer's warpgroup's third warp. Warps go to the SM's four
/// sub-partitions by their index mod 4, so warps 10 to 15 put two converters on sub-partitions
/// 2 and 3 and one on 0 and 1 (beside two consumer warps each; warp 8 issues the loads, warp 9
/// idles). Six, not seven: the converters' chunk layout needs a multiple of 24 threads.
const FIRST_CONVERTER: u32 = CONSUMERS * index::WARPGROUP + 2 * index::WARP;
/// The converter threads.
pub const CONVERTERS: u32 = THREADS - FIRST_CONVERTER;
/// Registers at entry: a CTA of [`THREADS`] fits the register file at 128, not at the 16-bit
/// kernels' cap (the PTX build gives these kernels a `.maxnreg`).
const ENTRY_REGS: u32 = Kernel::fp8(FP8_656_ROW_BYTES, false, 0).entry_regs();
/// Registers of a computing consumer warpgroup.
const FP8_CONSUMER_REGS: u32 = 200;

/// What the converters get in a CTA of `cols` columns: their registers and the rows they convert
/// at a time (their staging slots are `contract::fp8_raw_slots`, which the host's shared-memory
/// size needs too).
struct ConverterBudget {
    /// Registers of the producer warpgroups. At 16 columns the converters keep two rows of
    /// chunks in flight with their scales and swizzled addresses (two rows spilled at 56) and
    /// warpgroup 1, which only keeps the frame's count ([`kv_on_m::keep_count`]), keeps its
    /// entry registers (ptxas spilled it at 112); at 32 both consumer warpgroups compute, and
    /// the converters give them what one row in flight leaves (56: spilled at 40).
    regs: u32,
    /// Rows a converter does at a time, all their loads issued before any store (the stores
    /// could alias them for all the compiler knows, so this is the ILP there is): two at 16
    /// columns, so that the wait for shared memory, long while the consumer's wgmmas read it,
    /// is paid once for six chunks (656 at 64K: 280.6 -> 270.0 µs, session 17, H100); one at
    /// 32, where the registers go to the second consumer.
    rows_in_flight: u32,
}

const fn converters(cols: u32) -> ConverterBudget {
    if cols == KV_ON_M_COLS[0] {
        ConverterBudget {
            regs: 88,
            rows_in_flight: 2,
        }
    } else {
        ConverterBudget {
            regs: 56,
            rows_in_flight: 1,
        }
    }
}
const _: () = assert!(
    (ENTRY_REGS - converters(KV_ON_M_COLS[0]).regs) * PRODUCER_WARPGROUPS >= FP8_CONSUMER_REGS - ENTRY_REGS
        && (ENTRY_REGS - converters(KV_ON_M_COLS[1]).regs) * PRODUCER_WARPGROUPS
            >= (FP8_CONSUMER_REGS - ENTRY_REGS) * CONSUMERS,
    "the consumers would take more registers than the converters give back"
);
/// 16-byte chunks (8 bf16) of a tile row: 576 / 8.
const ROW_CHUNKS: u32 = D_QK as u32 / 8;

/// The FP8 kernel for CTAs of `COLS` (16 or 32) columns.
#[inline(always)]
unsafe fn decode_fp8<const ROW: u32, E: Elem, const COLS: u32>(prm: &DecodeParams) {
    let sm = Smem::new(COLS, COLS / 2);
    let ring = RawRing::<ROW, COLS>::new();
    let group = index::group();
    let t = index::thread_x();
    if t == 0 {
        // Initialized here, fenced and synchronized by the prologue with the ring's.
        for slot in 0..RawRing::<ROW, COLS>::SLOTS {
            mbarrier::init(ring.full(slot), 1);
            mbarrier::init(ring.empty(slot), CONVERTERS);
        }
    }
    match prologue::<STAGES, CONVERTERS>(prm, &sm) {
        Some(range) => {
            if sync::warp_uniform(t / index::WARPGROUP) >= CONSUMERS {
                sync::setmaxnreg!(dec, converters(COLS).regs);
                if t == CONSUMERS * index::WARPGROUP {
                    produce_raw(prm, &range, &sm, group, &ring);
                } else if t >= FIRST_CONVERTER {
                    let rank = t - FIRST_CONVERTER;
                    merge::write_empty(prm, group, COLS, rank, CONVERTERS);
                    merge::publish_empty_splits(prm, group, COLS, rank, CONVERTERS, BAR_IDLE);
                    convert(prm, &range, &sm, &ring, rank);
                }
            } else if COLS != KV_ON_M_COLS[0] {
                // 32 columns: both warpgroups compute 16 each, as in the 16-bit kernel.
                sync::setmaxnreg!(inc, FP8_CONSUMER_REGS);
                kv_on_m::consume::<16, E, false>(prm, &range, &sm, group);
            } else if sync::warp_uniform(t / index::WARPGROUP) == 0 {
                // 16 columns: warpgroup 0 computes all 16: each tile is read once as the wgmma
                // A operand (two warpgroups of 8 read it twice, which bound the kernel by shared
                // memory, session 11).
                sync::setmaxnreg!(inc, FP8_CONSUMER_REGS);
                kv_on_m::consume::<16, E, true>(prm, &range, &sm, group);
            } else {
                kv_on_m::keep_count::<E>(prm, &range, &sm, group, COLS);
            }
        }
        None => merge::write_empty(prm, group, COLS, t, THREADS),
    }
}

/// The staging ring of the CTA of `COLS` columns: [`Self::SLOTS`] boxes of [`FP8_BOX_ROWS`] raw
/// rows of `ROW` bytes, then a `full` mbarrier per slot (the copy engine's bytes) and an `empty`
/// one (the converters' [`CONVERTERS`] arrivals). Boxes go round it in order: box `j` (half
/// `j % 2` of a tile) in slot `j % SLOTS`, in phase `(j / SLOTS) % 2`.
struct RawRing<const ROW: u32, const COLS: u32> {
    base: u32,
}

impl<const ROW: u32, const COLS: u32> RawRing<ROW, COLS> {
    const BOX_BYTES: u32 = FP8_BOX_ROWS * ROW;
    const SLOTS: u32 = fp8_raw_slots(COLS);

    #[inline(always)]
    fn new() -> Self {
        RawRing {
            base: smem::base() + fp8_staging_offset(COLS),
        }
    }
    #[inline(always)]
    fn slot(&self, slot: u32) -> u32 {
        self.base + slot * Self::BOX_BYTES
    }
    #[inline(always)]
    fn full(&self, slot: u32) -> u32 {
        self.base + Self::SLOTS * Self::BOX_BYTES + 8 * slot
    }
    #[inline(always)]
    fn empty(&self, slot: u32) -> u32 {
        self.full(Self::SLOTS) + 8 * slot
    }
}

/// Where box `j` goes round a ring of `slots`: its slot and the parity of its round, counted on
/// rather than computed from `j` (no division in the producer's and converters' loops).
#[derive(Clone, Copy)]
struct RingPos {
    slot: u32,
    round: u32,
}

impl RingPos {
    const START: RingPos = RingPos { slot: 0, round: 0 };
    #[inline(always)]
    fn next(self, slots: u32) -> RingPos {
        if self.slot + 1 == slots {
            RingPos {
                slot: 0,
                round: self.round + 1,
            }
        } else {
            RingPos {
                slot: self.slot + 1,
                round: self.round,
            }
        }
    }
}

/// The producer thread: each request's Q, then each tile's raw rows as two boxes of
/// [`FP8_BOX_ROWS`] (from the page the block table names, or zeros for an entry outside the
/// cache) into the staging ring, each once the converters are done with its slot's last box.
///
/// # Safety
/// One thread, after the prologue; the KV tensor map has boxes of [`FP8_BOX_ROWS`] raw rows.
#[inline(always)]
unsafe fn produce_raw<const ROW: u32, const COLS: u32>(
    prm: &DecodeParams,
    range: &WorkRange,
    sm: &Smem,
    group: u32,
    ring: &RawRing<ROW, COLS>,
) {
    let mut pos = RingPos::START;
    for_each_producer_tile!(prm, range, sm, group, COLS, |_r, _, table, tile, _it| {
        // Pages of 64 rows: tile `tile` is page slot `tile`, below `max_pages`.
        let row = prm.page_row(*table.add(tile as usize), 0, prm.kv_stride);
        for half in 0..TILE_ROWS as u32 / FP8_BOX_ROWS {
            if pos.round > 0 {
                tile::wait(ring.empty(pos.slot), (pos.round - 1) & 1);
            }
            let full = ring.full(pos.slot);
            mbarrier::arrive_expect_tx(full, RawRing::<ROW, COLS>::BOX_BYTES);
            // An entry outside the cache gave the row past it: both halves read zeros.
            tma::load_2d(
                prm.kv_map,
                ring.slot(pos.slot),
                full,
                0,
                row + (half * FP8_BOX_ROWS) as i32,
            );
            pos = pos.next(RawRing::<ROW, COLS>::SLOTS);
        }
    });
}

/// The converters: for each tile of the part, its two raw boxes from the staging ring to the
/// f16 tile of the ring, in the 128-byte-swizzled layout the consumers read. `rank` of
/// [`CONVERTERS`].
///
/// # Safety
/// The converter threads, after the prologue.
#[inline(always)]
unsafe fn convert<const ROW: u32, const COLS: u32>(
    prm: &DecodeParams,
    range: &WorkRange,
    sm: &Smem,
    ring: &RawRing<ROW, COLS>,
    rank: u32,
) {
    let mut it = 0u32;
    let mut pos = RingPos::START;
    let lane = ConvLane::new(rank);
    for r in range.begin_req..=range.end_req {
        let (_, lo, hi) = prm.segment(range, r);
        for _ in lo..hi {
            let stage = it % STAGES;
            if it >= STAGES {
                tile::wait(sm.empty + 8 * stage, (it / STAGES - 1) & 1);
            }
            let dst = sm.pages + stage * TILE_BYTES;
            for half in 0..TILE_ROWS as u32 / FP8_BOX_ROWS {
                tile::wait(ring.full(pos.slot), pos.round & 1);
                lane.convert_box::<ROW>(
                    ring.slot(pos.slot),
                    dst + half * FP8_BOX_ROWS * ROW_BYTES,
                    converters(COLS).rows_in_flight,
                );
                // The box's reads are done (the arrival releases them): the slot is free.
                mbarrier::arrive(ring.empty(pos.slot));
                pos = pos.next(RawRing::<ROW, COLS>::SLOTS);
            }
            // The tile's writes, for the tensor cores; then the stage is full.
            sync::fence_proxy_async_shared();
            mbarrier::arrive(sm.full + 8 * stage);
            it += 1;
        }
    }
}

/// Chunk columns of a converter's share of a box: [`CONVERTERS`] = 24 x 8 threads, thread
/// `24 * r0 + c` converting the 16-byte chunks `c`, `c + 24`, `c + 48` (of 72 in a tile row)
/// of the box's rows `r0`, `r0 + 8`, ... so that each thread's chunks (their source offsets,
/// scales and swizzle) are fixed and only the row moves.
const CHUNK_LANES: u32 = ROW_CHUNKS / 3;
const ROW_LANES: u32 = CONVERTERS / CHUNK_LANES;
const _: () = assert!(
    CHUNK_LANES * ROW_LANES == CONVERTERS
        && FP8_BOX_ROWS.is_multiple_of(ROW_LANES * converters(KV_ON_M_COLS[0]).rows_in_flight)
        && FP8_BOX_ROWS.is_multiple_of(ROW_LANES * converters(KV_ON_M_COLS[1]).rows_in_flight)
        && 3 * converters(KV_ON_M_COLS[0]).rows_in_flight <= 8
        && 3 * converters(KV_ON_M_COLS[1]).rows_in_flight <= 8
);

/// Whether a thread's `i`-th chunk of the rows in flight, in 64-value block `block`, is the
/// 656-byte format's RoPE part (bf16 already): its third chunk (`c + 48`) for `c >= 16`. Only
/// those hold four words, the others two.
#[inline(always)]
pub(crate) fn is_rope<const ROW: u32>(i: usize, block: u32) -> bool {
    ROW == FP8_656_ROW_BYTES && i % 3 == 2 && block == (D_V / 64) as u32
}

/// One converter thread's share of a box.
struct ConvLane {
    /// The first of its rows (`r0` above) and its first chunk (`c`).
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

    /// Convert this thread's share of the box at `src` ([`FP8_BOX_ROWS`] rows of `ROW` bytes)
    /// into the f16 rows at `dst` (the same rows of a tile in shared memory, swizzled), `rows`
    /// rows at a time ([`ConverterBudget::rows_in_flight`]: a constant once inlined).
    ///
    /// # Safety
    /// `src` and `dst` are a full raw box and a tile's rows in shared memory, not in use by
    /// anyone else.
    #[inline(always)]
    unsafe fn convert_box<const ROW: u32>(&self, src: u32, dst: u32, rows: u32) {
        let in_flight = 3 * rows as usize;
        for step in 0..FP8_BOX_ROWS / (ROW_LANES * rows) {
            let row0 = self.r0 + step * ROW_LANES * rows;
            // Sized for `unroll!`'s dead copies (indices up to 7); `in_flight` are used.
            let mut raw = [[0u32; 4]; 8];
            // The 656 format's block scales as f16 pairs.
            let mut scale = [0u32; 8];
            // Loads first.
            crate::unroll!(i < in_flight, max 8 => {
                let row = row0 + (i as u32 / 3) * ROW_LANES;
                let chunk = self.c + (i as u32 % 3) * CHUNK_LANES;
                let block = chunk / 8;
                let s = src + row * ROW;
                if is_rope::<ROW>(i, block) {
                    // The 656-byte format's RoPE part is bf16 already.
                    raw[i] = smem::ld_v4_u32(s + D_V as u32 + 16 + (chunk % 8) * 16);
                } else {
                    let [a, b] = smem::ld_v2_u32(s + chunk * 8);
                    raw[i] = [a, b, 0, 0];
                    if ROW == FP8_656_ROW_BYTES {
                        // One f32 scale per 128 values, after the 512 e4m3.
                        let f = smem::ld_f32(s + D_V as u32 + 4 * (block / 2));
                        scale[i] = math::pack_f16x2(f, f);
                    }
                }
            });
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

/// Eight e4m3 (`x`: four a word, the first in the low byte) as eight f16 in four words (the
/// first in the low half), times the f16 pair `scale` when `scaled`.
#[inline(always)]
pub(crate) fn e4m3x8_to_f16(x: [u32; 2], scaled: bool, scale: u32) -> [u32; 4] {
    let mut v = [0u32; 4];
    for (w, &word) in x.iter().enumerate() {
        for h in 0..2 {
            let pair = math::e4m3x2_to_f16x2((word >> (16 * h)) as u16);
            v[2 * w + h] = if scaled { math::mul_f16x2(pair, scale) } else { pair };
        }
    }
    v
}

/// The rows of the two formats, checked against the kernel's layout arithmetic.
const _: () =
    assert!(FP8_656_ROW_BYTES as usize == D_V + 16 + 2 * (D_QK - D_V) && FP8_TENSOR_ROW_BYTES as usize == D_QK);
const _: () = assert!(QK_BLOCKS == 9 && ROW_CHUNKS == 72);

macro_rules! decode_fp8_entry {
    ($($name:ident = ($row:expr, $e:ty, $cols:literal);)*) => {$(
        /// ETAP split-KV decode of CTAs of 16 or 32 columns over an FP8 cache; see the module
        /// documentation. Launch: grid (column groups, parts), [`THREADS`] threads,
        /// `etap_core::contract::fp8_smem_bytes` bytes.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(params: DecodeParams) {
            decode_fp8::<{ $row }, $e, $cols>(&params)
        }
    )*};
}

decode_fp8_entry! {
    etap_decode_fp8_656_c16 = (FP8_656_ROW_BYTES, Fp8Blocks<false>, 16);
    etap_decode_fp8_tensor_c16 = (FP8_TENSOR_ROW_BYTES, Fp8Tensor<false>, 16);
    etap_decode_fp8_656_c16_f16 = (FP8_656_ROW_BYTES, Fp8Blocks<true>, 16);
    etap_decode_fp8_tensor_c16_f16 = (FP8_TENSOR_ROW_BYTES, Fp8Tensor<true>, 16);
    etap_decode_fp8_656_c32 = (FP8_656_ROW_BYTES, Fp8Blocks<false>, 32);
    etap_decode_fp8_tensor_c32 = (FP8_TENSOR_ROW_BYTES, Fp8Tensor<false>, 32);
    etap_decode_fp8_656_c32_f16 = (FP8_656_ROW_BYTES, Fp8Blocks<true>, 32);
    etap_decode_fp8_tensor_c32_f16 = (FP8_TENSOR_ROW_BYTES, Fp8Tensor<true>, 32);
}
