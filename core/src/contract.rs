//! The contract between the host and the decode kernels, defined once and compiled into both:
//! the kernels' parameter block, the tensor-map type, the launch shape, the shared-memory sizes
//! and the kernels' names. Nothing here is copied on either side; compile-time asserts pin the
//! layout.
use crate::{rows_of, tiles_of, WorkRange, QK_BLOCKS, TILE_ROWS};

/// A CUtensorMap (128 bytes, 64-byte aligned), encoded on the host by `cuTensorMapEncodeTiled`
/// and kept in global memory, where the kernels' copy engine reads it.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap(pub [u64; 16]);

/// Threads of a warpgroup (the unit of wgmma and of `setmaxnreg`).
pub const WARPGROUP: u32 = 128;
/// KV page buffers in a decode CTA's ring: two 72 KiB pages (three would not fit in 227 KiB
/// next to even a 16-column Q tile).
pub const STAGES: u32 = 2;
/// Consumer warpgroups of a decode CTA.
pub const CONSUMERS: u32 = 2;
/// Threads of a decode CTA: the consumer warpgroups plus a producer warpgroup (one thread of
/// which issues the loads; a whole warpgroup so that it can hand its registers over with
/// `setmaxnreg`).
pub const DECODE_THREADS: u32 = (CONSUMERS + 1) * WARPGROUP;
/// Threads of an FP8 decode CTA (`kernels/src/decode/fp8.rs`): the consumers, the producer
/// warpgroup and a second warpgroup, so that the warps that turn the FP8 rows into f16 tiles
/// are six (two on each of two SM sub-partitions, one on each other) rather than three.
pub const FP8_THREADS: u32 = (CONSUMERS + 2) * WARPGROUP;
/// Converter threads of the wide FP8 kernel: the whole producer warpgroup (its first thread
/// also loads Q and prefetches the pages), 8 threads a row (the converters' chunk layout).
pub const FP8_WIDE_CONVERTERS: u32 = WARPGROUP;
/// 32-bit registers of an SM's register file, which a CTA's threads share (one CTA an SM).
pub const REGISTER_FILE: u32 = 65_536;
/// Bytes of one 128-byte swizzle row: a shared-memory tile row of 64 16-bit elements.
pub const ROW_BYTES: u32 = 128;
/// Bytes of one page of KV in shared memory: 64 rows of 576 16-bit elements.
pub const TILE_BYTES: u32 = QK_BLOCKS as u32 * TILE_ROWS as u32 * ROW_BYTES;
/// (token, head) rows of a heads-on-M (wide) CTA: one wgmma M.
pub const WIDE_ROWS: u32 = 64;
/// The most dynamic shared memory a CTA may have on sm_90 (227 KiB).
pub const MAX_SMEM: u32 = 232_448;

/// Dynamic shared memory of an ETAP (KV-on-M) decode CTA of `cols` columns (two consumer
/// warpgroups of `cols / 2`): Q, the KV ring, the two P tiles, the column reductions' scratch
/// (2 buffers x 4 warps x `cols / 2` floats per warpgroup), the mbarriers (full and empty per
/// stage, Q's full and empty).
pub const fn decode_smem_bytes(cols: u32) -> u32 {
    let nw = cols / 2;
    QK_BLOCKS as u32 * cols * ROW_BYTES
        + STAGES * TILE_BYTES
        + CONSUMERS * nw * ROW_BYTES
        + CONSUMERS * 2 * 4 * nw * 4
        + 16 * STAGES
        + 16
}

/// Dynamic shared memory of a wide (heads-on-M) decode CTA: Q (64 rows), the KV ring, one P
/// tile of 64 x 64, the scorer's hand-overs (the rows' rescale factors and their 1 / l, 64 f32
/// each in slots sized for two warpgroups), the mbarriers.
pub const fn wide_smem_bytes() -> u32 {
    QK_BLOCKS as u32 * WIDE_ROWS * ROW_BYTES
        + STAGES * TILE_BYTES
        + WIDE_ROWS * ROW_BYTES
        + 4 * WIDE_ROWS * 4
        + 16 * STAGES
        + 16
}

/// Columns per CTA of the ETAP kernel's builds (`etap_decode_{dtype}_c{cols}`).
pub const KV_ON_M_COLS: [u32; 2] = [16, 32];

const _: () = assert!(decode_smem_bytes(KV_ON_M_COLS[1]) <= MAX_SMEM && wide_smem_bytes() <= MAX_SMEM);
const _: () = assert!(core::mem::size_of::<TensorMap>() == 128 && core::mem::align_of::<TensorMap>() == 64);

const _: () = assert!(
    fp8_smem_bytes(FP8_656_ROW_BYTES, KV_ON_M_COLS[0]) <= MAX_SMEM
        && fp8_smem_bytes(FP8_656_ROW_BYTES, KV_ON_M_COLS[1]) <= MAX_SMEM
);
// A box is whole 128-byte lines (the copy engine's destinations stay aligned) and a tile is two.
const _: () = assert!(
    (FP8_BOX_ROWS * FP8_656_ROW_BYTES).is_multiple_of(128)
        && (FP8_BOX_ROWS * FP8_TENSOR_ROW_BYTES).is_multiple_of(128)
        && 2 * FP8_BOX_ROWS == TILE_ROWS as u32
);

/// The kernels of the module, each with the name both sides use: the host looks them up by it,
/// the PTX checks require each to be defined (the kernels' `#[no_mangle]` entries carry it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The ETAP decode kernel for CTAs of `KV_ON_M_COLS[cols]` columns.
    Decode { f16: bool, cols: usize },
    /// The wide (heads-on-M) decode kernel.
    Wide { f16: bool },
    /// The ETAP decode kernel over an FP8 cache for CTAs of `KV_ON_M_COLS[cols]` columns, by its
    /// cache's row bytes (`FP8_656_ROW_BYTES` or `FP8_TENSOR_ROW_BYTES`) and its q and out (fp16
    /// when `f16`, else bf16).
    DecodeFp8 { row_bytes: u32, f16: bool, cols: usize },
    /// The wide (heads-on-M) decode kernel over an FP8 cache, by its cache's row bytes and its
    /// q and out (fp16 when `f16`, else bf16): the wide kernel's layout and consumers, its
    /// producer warpgroup converting the cache's rows from global memory
    /// ([`FP8_WIDE_CONVERTERS`]).
    WideFp8 { row_bytes: u32, f16: bool },
    /// The one-thread scheduler.
    Schedule,
}

impl Kernel {
    /// Every kernel of the decode path.
    pub const ALL: [Kernel; 19] = [
        Kernel::Decode { f16: false, cols: 0 },
        Kernel::Decode { f16: false, cols: 1 },
        Kernel::Decode { f16: true, cols: 0 },
        Kernel::Decode { f16: true, cols: 1 },
        Kernel::Wide { f16: false },
        Kernel::Wide { f16: true },
        Kernel::fp8(FP8_656_ROW_BYTES, false, 0),
        Kernel::fp8(FP8_TENSOR_ROW_BYTES, false, 0),
        Kernel::fp8(FP8_656_ROW_BYTES, true, 0),
        Kernel::fp8(FP8_TENSOR_ROW_BYTES, true, 0),
        Kernel::fp8(FP8_656_ROW_BYTES, false, 1),
        Kernel::fp8(FP8_TENSOR_ROW_BYTES, false, 1),
        Kernel::fp8(FP8_656_ROW_BYTES, true, 1),
        Kernel::fp8(FP8_TENSOR_ROW_BYTES, true, 1),
        Kernel::WideFp8 {
            row_bytes: FP8_656_ROW_BYTES,
            f16: false,
        },
        Kernel::WideFp8 {
            row_bytes: FP8_TENSOR_ROW_BYTES,
            f16: false,
        },
        Kernel::WideFp8 {
            row_bytes: FP8_656_ROW_BYTES,
            f16: true,
        },
        Kernel::WideFp8 {
            row_bytes: FP8_TENSOR_ROW_BYTES,
            f16: true,
        },
        Kernel::Schedule,
    ];

    /// [`Kernel::DecodeFp8`], shorter.
    pub const fn fp8(row_bytes: u32, f16: bool, cols: usize) -> Kernel {
        Kernel::DecodeFp8 { row_bytes, f16, cols }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Decode { f16: false, cols: 0 } => "etap_decode_bf16_c16",
            Kernel::Decode { f16: false, .. } => "etap_decode_bf16_c32",
            Kernel::Decode { f16: true, cols: 0 } => "etap_decode_f16_c16",
            Kernel::Decode { f16: true, .. } => "etap_decode_f16_c32",
            Kernel::Wide { f16: false } => "etap_decode_wide_bf16",
            Kernel::Wide { f16: true } => "etap_decode_wide_f16",
            Kernel::DecodeFp8 { row_bytes, f16, cols } => match (row_bytes == FP8_656_ROW_BYTES, f16, cols) {
                (true, false, 0) => "etap_decode_fp8_656_c16",
                (false, false, 0) => "etap_decode_fp8_tensor_c16",
                (true, true, 0) => "etap_decode_fp8_656_c16_f16",
                (false, true, 0) => "etap_decode_fp8_tensor_c16_f16",
                (true, false, _) => "etap_decode_fp8_656_c32",
                (false, false, _) => "etap_decode_fp8_tensor_c32",
                (true, true, _) => "etap_decode_fp8_656_c32_f16",
                (false, true, _) => "etap_decode_fp8_tensor_c32_f16",
            },
            Kernel::WideFp8 { row_bytes, f16 } => match (row_bytes == FP8_656_ROW_BYTES, f16) {
                (true, false) => "etap_decode_fp8_656_wide",
                (false, false) => "etap_decode_fp8_tensor_wide",
                (true, true) => "etap_decode_fp8_656_wide_f16",
                (false, true) => "etap_decode_fp8_tensor_wide_f16",
            },
            Kernel::Schedule => "etap_schedule",
        }
    }

    /// Threads of a CTA.
    pub const fn threads(self) -> u32 {
        match self {
            Kernel::Decode { .. } | Kernel::Wide { .. } | Kernel::WideFp8 { .. } => DECODE_THREADS,
            Kernel::DecodeFp8 { .. } => FP8_THREADS,
            Kernel::Schedule => 1,
        }
    }

    /// A thread's registers at entry, which `setmaxnreg` trades from: the module's cap
    /// (`DECODE_ENTRY_REGS`, a JIT option), or where a CTA of [`Kernel::threads`] would not fit
    /// the register file at that cap, what does (in `setmaxnreg`'s steps of 8). The PTX build
    /// gives such a kernel its cap as a `.maxnreg` directive (`etap_ptx_builder`).
    pub const fn entry_regs(self) -> u32 {
        let fit = REGISTER_FILE / self.threads() / 8 * 8;
        if fit < crate::DECODE_ENTRY_REGS {
            fit
        } else {
            crate::DECODE_ENTRY_REGS
        }
    }

    /// Dynamic shared memory of a CTA (0 for the scheduler).
    pub const fn smem_bytes(self) -> u32 {
        match self {
            Kernel::Decode { cols, .. } => decode_smem_bytes(KV_ON_M_COLS[cols]),
            Kernel::Wide { .. } | Kernel::WideFp8 { .. } => wide_smem_bytes(),
            Kernel::DecodeFp8 { row_bytes, cols, .. } => fp8_smem_bytes(row_bytes, KV_ON_M_COLS[cols]),
            Kernel::Schedule => 0,
        }
    }
}

/// Everything a decode kernel reads, passed by value as its one kernel parameter (the tensor
/// maps themselves live in global memory: a by-value map would need 64-byte parameter
/// alignment, more than rustc's PTX kernel ABI gives). The host fills it with device addresses.
#[repr(C)]
pub struct DecodeParams {
    pub q_map: *const TensorMap,
    pub kv_map: *const TensorMap,
    pub block_table: *const i32,
    pub seqlens: *const i32,
    /// The packed query layout's token offsets `[b + 1]` (`cu_seqlens_q`: request `r`'s tokens
    /// are rows `q_offsets[r]..q_offsets[r + 1]` of q, out and lse), or null for the uniform
    /// layout (`s_q` tokens each).
    pub q_offsets: *const i32,
    pub ranges: *const WorkRange,
    pub split_offsets: *const u32,
    /// Final output [b, s_q, h_q, 512] (16-bit) and lse [b, h_q, s_q]; packed: out
    /// [total_q, h_q, 512] and lse [total_q, h_q].
    pub out: *mut u16,
    pub lse: *mut f32,
    /// Partial outputs [split][col][512] f32 and lse [split][col] (natural log).
    pub o_accum: *mut f32,
    pub lse_accum: *mut f32,
    /// The merge's counters, [b][column groups] (kernels/src/merge.rs).
    pub counters: *mut u32,
    /// The cache's first byte: the wide FP8 kernel's converters read its rows themselves
    /// (`kernels/src/decode/fp8_wide.rs`); the other kernels read the cache through `kv_map`.
    pub kv: *const u8,
    pub batch: u32,
    /// Query tokens per request (the packed layout: at most; a request's count is clamped to it).
    pub s_q: u32,
    pub h_q: u32,
    /// Entries of a request's block-table row (its stride).
    pub max_pages: u32,
    /// Pages of the cache: a block-table entry outside `0..num_pages` reads as a page of zeros.
    pub num_pages: u32,
    /// softmax_scale * log2(e).
    pub scale_log2: f32,
    /// Rows of a cache page, one of `PAGE_SIZES`.
    pub page_size: u32,
    /// A request's rows at most: the block table's capacity, `max_pages * page_size` (the host
    /// checks that it fits an i32), and the same in KV tiles, rounded up. Passed rather than
    /// computed: the producer thread has 24 registers.
    pub max_rows: u32,
    pub max_tiles: u32,
    /// Query tokens of the packed layout (rows of q, out and lse); 0 for the uniform one.
    pub total_q: u32,
    /// An FP8 cache's rows between pages in its tensor map (FlashMLA's 656-byte format lays
    /// out 65 rows a page of 64), and the per-tensor format's scale (1 otherwise).
    pub kv_stride: u32,
    pub kv_scale: f32,
}

/// Thirteen device addresses, then twelve 32-bit values.
const _: () = assert!(core::mem::size_of::<DecodeParams>() == 13 * 8 + 12 * 4);

/// FP8 cache formats the ETAP kernel of 16 columns dequantizes on load (issue 14), by their
/// bytes a row: FlashMLA's "FP8 with scale" (512 e4m3, 4 f32 scales, 64 bf16) and per-tensor
/// e4m3 (576 e4m3, one scale for the cache).
pub const FP8_656_ROW_BYTES: u32 = 656;
pub const FP8_TENSOR_ROW_BYTES: u32 = 576;

/// Rows of an FP8 cache's raw box: half a tile, so that the converters work on one box while
/// the copy engine fills the next two (a whole tile a box left one in flight, and the SM idle
/// while it was converted).
pub const FP8_BOX_ROWS: u32 = 32;
/// Raw boxes in the FP8 kernel's staging ring for CTAs of `cols` columns: three of 32 rows of
/// 656 bytes (61.5 KiB) are what fits beside the 16-bit layout of 16 columns in 227 KiB (four
/// would not); beside the layout of 32 columns (Q and P twice the size) two fit (three would
/// take 252,592 bytes).
pub const fn fp8_raw_slots(cols: u32) -> u32 {
    if cols <= KV_ON_M_COLS[0] {
        3
    } else {
        2
    }
}

/// Dynamic shared memory of the FP8 ETAP kernel for CTAs of `cols` columns: the 16-bit kernel's
/// layout, then (128-aligned, for the copy engine) the staging ring of [`fp8_raw_slots`] boxes
/// of [`FP8_BOX_ROWS`] raw rows of `row_bytes` bytes, then its mbarriers (raw full per slot,
/// then raw empty per slot).
pub const fn fp8_smem_bytes(row_bytes: u32, cols: u32) -> u32 {
    fp8_staging_offset(cols) + fp8_raw_slots(cols) * (FP8_BOX_ROWS * row_bytes + 16)
}

/// Where the FP8 kernel's staging buffer starts in its dynamic shared memory (CTAs of `cols`).
pub const fn fp8_staging_offset(cols: u32) -> u32 {
    decode_smem_bytes(cols).div_ceil(128) * 128
}

/// Where one request's (token, head) columns `n = token * h_q + head` live: its first row of q
/// and out (rows of 576 / 512 elements: column `n` is row `row0 + n`), its column count, its
/// token count, and its lse at `lse0 + head * lse_head + token * lse_token`.
#[derive(Clone, Copy)]
pub struct ReqCols {
    pub row0: u32,
    pub n: u32,
    pub q_len: u32,
    pub lse0: u32,
    pub lse_head: u32,
    pub lse_token: u32,
}

impl ReqCols {
    /// The lse index of column `n` (`h_q` heads).
    #[inline(always)]
    pub fn lse_at(&self, n: u32, h_q: u32) -> u32 {
        let (token, head) = (n / h_q, n % h_q);
        self.lse0 + head * self.lse_head + token * self.lse_token
    }
}

/// Rows of one TMA box of a KV load for cache pages of `page_size` rows: a whole page when it
/// is smaller than a tile (the tile gathers `TILE_ROWS / page_size` of them), else a tile.
pub const fn kv_box_rows(page_size: u32) -> u32 {
    if page_size < TILE_ROWS as u32 {
        page_size
    } else {
        TILE_ROWS as u32
    }
}

impl DecodeParams {
    /// (token, head) columns per request of the grid and of the partial-result buffers:
    /// `s_q * h_q` (a packed request may have fewer, [`ReqCols::n`]).
    #[inline(always)]
    pub fn n_max(&self) -> u32 {
        self.s_q * self.h_q
    }

    /// Request `r`'s columns ([`ReqCols`]). Uniform layout: `s_q` tokens at rows
    /// `r * s_q * h_q ..`, lse `[b, h_q, s_q]`. Packed: the tokens `q_offsets[r]..q_offsets[r + 1]`,
    /// clamped to `[0, total_q]` and to at most `s_q` tokens (so that no device-side offset,
    /// checked or not, makes a CTA read or write outside q, out and lse), lse `[total_q, h_q]`.
    ///
    /// # Safety
    /// `r < batch`; a non-null `q_offsets` has `batch + 1` entries.
    #[inline(always)]
    pub unsafe fn req_cols(&self, r: u32) -> ReqCols {
        if self.q_offsets.is_null() {
            let n = self.s_q * self.h_q;
            ReqCols {
                row0: r * n,
                n,
                q_len: self.s_q,
                lse0: r * n,
                lse_head: self.s_q,
                lse_token: 1,
            }
        } else {
            let clamp = |x: i32, lo: u32| -> u32 {
                let x = if x < 0 { 0 } else { x as u32 };
                let x = if x < lo { lo } else { x };
                if x > self.total_q {
                    self.total_q
                } else {
                    x
                }
            };
            let first = clamp(*self.q_offsets.add(r as usize), 0);
            let end = clamp(*self.q_offsets.add(r as usize + 1), first);
            let q_len = if end - first < self.s_q { end - first } else { self.s_q };
            let row0 = first * self.h_q;
            ReqCols {
                row0,
                n: q_len * self.h_q,
                q_len,
                lse0: row0,
                lse_head: 1,
                lse_token: self.h_q,
            }
        }
    }

    /// How many splits request `r`'s KV was cut into (1: the segment writes the final output).
    ///
    /// # Safety
    /// `r` is a request of the batch; `split_offsets` has `batch + 1` entries.
    #[inline(always)]
    pub unsafe fn splits(&self, r: u32) -> u32 {
        *self.split_offsets.add(r as usize + 1) - *self.split_offsets.add(r as usize)
    }

    /// Request `r`'s rows read (its seqlen clamped to the block table) and the pages
    /// `[lo, hi)` of it inside `range` (`lo == hi` when none): the segment the producer and the
    /// consumers of either decode kernel work through. The pages are the plan's, clamped to the
    /// request's current length, and none for a request the plan gave no split (it was empty
    /// when planned): with a stale plan the kernel reads no page the plan did not assign.
    ///
    /// # Safety
    /// `r` is a request of `range`; `seqlens` points to the batch's lengths.
    #[inline(always)]
    pub unsafe fn segment(&self, range: &WorkRange, r: u32) -> (u32, u32, u32) {
        let seqlen = *self.seqlens.add(r as usize);
        let (lo, hi) = range.segment(r, tiles_of(seqlen, self.max_tiles));
        let hi = if self.splits(r) == 0 { lo } else { hi };
        (rows_of(seqlen, self.max_rows), lo, hi)
    }

    /// The cache row of page `id`'s row `row`, for pages of `page_size` rows (`self.page_size`,
    /// which the producer passes as a constant): a block-table entry outside the cache maps to
    /// the first row past it, which the copy engine fills with zeros (never another page; the
    /// host checks that `(num_pages + 1) * page_size` fits an i32).
    #[inline(always)]
    pub fn page_row(&self, id: i32, row: u32, page_size: u32) -> i32 {
        let page = if (id as u32) < self.num_pages {
            id as u32
        } else {
            self.num_pages
        };
        (page * page_size + row) as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_have_distinct_names_and_fit_shared_memory() {
        for (i, a) in Kernel::ALL.iter().enumerate() {
            assert!(a.smem_bytes() <= MAX_SMEM, "{}", a.name());
            for b in &Kernel::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
        // The ETAP kernels' sizes as the layout adds them up: Q 9 x 128 bytes a column, two
        // pages of 72 KiB, P 128 bytes a column, the reduction scratch, 48 bytes of mbarriers.
        assert_eq!(
            decode_smem_bytes(16),
            9 * 16 * 128 + 2 * 73_728 + 16 * 128 + 2 * 2 * 4 * 8 * 4 + 48
        );
        assert_eq!(wide_smem_bytes(), 230_448);
        // The 16-bit layout (168,576, 128-aligned), then three 32-row boxes and their barriers.
        assert_eq!(fp8_smem_bytes(FP8_656_ROW_BYTES, 16), 168_576 + 3 * (32 * 656 + 16));
        assert_eq!(fp8_staging_offset(16), 168_576);
        // 32 columns: the layout of 32 (189,488, 128-aligned), then two boxes.
        assert_eq!(fp8_smem_bytes(FP8_656_ROW_BYTES, 32), 189_568 + 2 * (32 * 656 + 16));
        assert_eq!(fp8_smem_bytes(FP8_656_ROW_BYTES, 32), 231_584);
        // Three slots would not fit at 32 columns.
        const { assert!(189_568 + 3 * (32 * 656 + 16) > MAX_SMEM) };
        assert_eq!(
            Kernel::Decode { f16: true, cols: 1 }.smem_bytes(),
            decode_smem_bytes(32)
        );
    }
}
