//! The split plan (FlashMLA's `get_mla_metadata`) and the decode launch.
#[cfg(doc)]
use crate::decoder::Decoder;
use crate::driver::{self, PinnedBuffer};
use crate::dtype::Dtype;
use crate::error::{EtapError, Result};
use crate::shape::{DecodeShape, KvFormat};
use crate::tma::{encode_2d, encode_rows, DeviceMap, TensorMap};
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::sys::CUstream;
use etap_core::contract::{kv_box_rows, Kernel, KV_ON_M_COLS};
use etap_core::{max_splits, COLS_PER_CTA, D_QK, D_V};

/// Columns per CTA of the ETAP (KV-on-M) kernel at most: its variants are built for 16 and 32
/// (wider requests take the heads-on-M kernel, or several column groups when forced).
pub const KV_ON_M_MAX_COLS: u32 = KV_ON_M_COLS[KV_ON_M_COLS.len() - 1];
use std::ffi::c_void;
use std::sync::Mutex;

/// (q, cache) address pairs whose tensor maps a plan keeps on the device (a DeepSeek-V3 model
/// has 61 layers); past this, slots are reused round-robin.
pub(crate) const MAP_SLOTS: usize = 128;
/// u32 words of one `etap_core::WorkRange`.
const RANGE_WORDS: usize = std::mem::size_of::<etap_core::WorkRange>() / 4;

/// Which way round a CTA puts the work on the tensor cores' M dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// ETAP: the page's 64 KV rows on M, the (token, head) columns on N (`S^T = K·Q^T`), so that
    /// 16 or 32 columns waste nothing. CTAs of 16 or 32 columns.
    KvOnM,
    /// Heads on M (the wide kernel): 64 (token, head) rows on M, the KV rows on N
    /// (`S = Q·K^T`). For 32 or more columns, where M is (nearly) full anyway and the wider
    /// GEMMs and the row softmax cost less than ETAP's narrow GEMMs and column reductions.
    HeadsOnM,
}

/// Columns (`s_q * h_q`) from which [`Layout::for_shape`] picks [`Layout::HeadsOnM`] over a
/// 16-bit cache: past 16 columns (the ETAP kernel's CTA of 32) the wide kernel, 47-73% of its
/// rows padding, already beats the ETAP kernel (H200 serving mode, b16 64K: h20 334.3 against
/// 346.9 us, h24 332.7 against 344.8; s_q 3 x h6 at 16K 89.0 against 93.1; docs/perf-notes.md).
/// The ETAP kernel's 32-column CTA is kept for `Decoder::plan_with_layout`.
pub const WIDE_MIN_COLS: usize = 17;

/// Columns of a CTA over an FP8 cache at most: the FP8 kernel is built for CTAs of 16 and 32
/// columns (`etap_decode_fp8_*_c{16,32}*`, docs/design.md §4d), the ETAP kernel's column counts,
/// so a request of more than 32 columns runs as column groups of 32 (`ceil(s_q * h_q / 32)` CTAs
/// a part, each converting its part's pages itself), unless [`FP8_WIDE_MIN_COLS`] takes them
/// heads on M.
pub const FP8_MAX_COLS_PER_CTA: u32 = KV_ON_M_COLS[1];

/// Columns from which [`Layout::for_shape`] runs an FP8 cache heads on M: the wide FP8 kernel
/// converts each page once for 64 columns where the column groups of 32 convert it once for
/// each 32. Past 32 columns it is the faster in both formats (H100 serving mode, session 22,
/// docs/perf-notes.md: h128 16K per-tensor 187.5 against 323.5 us, 656 222.1 against 384.7);
/// at 32 the CTA of 32 converts once as well and is faster (s_q 2 h16 64K: 318 against 525 us,
/// session 18).
pub const FP8_WIDE_MIN_COLS: usize = FP8_MAX_COLS_PER_CTA as usize + 1;

impl Layout {
    /// The layout `Decoder::plan` uses for `shape`: over a 16-bit cache heads on M from
    /// [`WIDE_MIN_COLS`] columns; over an FP8 cache heads on M (the wide FP8 kernel) from
    /// [`FP8_WIDE_MIN_COLS`]; otherwise KV on M (the FP8 ETAP kernel, in groups of at most
    /// [`FP8_MAX_COLS_PER_CTA`] columns: [`ColumnTiling::for_shape`]).
    pub fn for_shape(shape: &DecodeShape) -> Layout {
        if shape.kv_format.fp8_row_bytes().is_some() {
            if shape.cols() >= FP8_WIDE_MIN_COLS {
                Layout::HeadsOnM
            } else {
                Layout::KvOnM
            }
        } else if shape.cols() >= WIDE_MIN_COLS {
            Layout::HeadsOnM
        } else {
            Layout::KvOnM
        }
    }
}

/// How the (token, head) columns of a request are laid over CTAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnTiling {
    pub layout: Layout,
    /// Columns per CTA: for [`Layout::KvOnM`] `s_q * h_q` rounded up to 16, at most 32 (over
    /// either cache); for [`Layout::HeadsOnM`] always 64 (one wgmma M; padding rows past
    /// `s_q * h_q` compute on but are never written).
    pub cols_per_cta: u32,
    /// Column groups: CTAs that share a part's KV pages, each with its own columns
    /// (`ceil(s_q * h_q / cols_per_cta)`).
    pub groups: u32,
}

impl ColumnTiling {
    /// How `shape`'s columns are laid over CTAs in `layout` (the one rule, for both cache kinds).
    pub fn for_shape(shape: &DecodeShape, layout: Layout) -> ColumnTiling {
        let n = shape.cols() as u32;
        let cols_per_cta = match layout {
            Layout::KvOnM => n.div_ceil(16).saturating_mul(16).min(KV_ON_M_MAX_COLS),
            Layout::HeadsOnM => COLS_PER_CTA as u32,
        };
        ColumnTiling {
            layout,
            cols_per_cta,
            groups: n.div_ceil(cols_per_cta),
        }
    }

    /// The kernel that runs this tiling for `dtype`.
    pub fn kernel(&self, dtype: Dtype) -> Kernel {
        let f16 = dtype == Dtype::F16;
        match self.layout {
            Layout::KvOnM => Kernel::Decode {
                f16,
                cols: KV_ON_M_COLS
                    .iter()
                    .position(|&c| c == self.cols_per_cta)
                    .expect("the tiling picks a built column count"),
            },
            Layout::HeadsOnM => Kernel::Wide { f16 },
        }
    }

    /// The kernel that runs this tiling for `dtype` q over a cache of `format`: [`Self::kernel`]
    /// for a 16-bit cache; for an FP8 cache, in the KV-on-M layout, the FP8 ETAP kernel of the
    /// tiling's CTA (16 or 32 columns) for `dtype` q and out, run over its column groups (any
    /// column count: a request of more than 32 columns takes `ceil(s_q * h_q / 32)` groups), and
    /// in the heads-on-M layout (the plan's past 32 columns) the wide FP8 kernel, which converts
    /// each page once for 64 columns. The plan checks its tiling against it with bf16, the decode call with its q's
    /// dtype.
    pub fn kernel_for(&self, dtype: Dtype, format: KvFormat) -> Result<Kernel> {
        let Some(row_bytes) = format.fp8_row_bytes() else {
            return Ok(self.kernel(dtype));
        };
        let f16 = dtype == Dtype::F16;
        Ok(match self.kernel(dtype) {
            Kernel::Decode { cols, .. } => Kernel::DecodeFp8 { row_bytes, f16, cols },
            _ => Kernel::WideFp8 { row_bytes, f16 },
        })
    }

    /// Dynamic shared memory of the CTAs of this tiling over a 16-bit cache (over an FP8 one:
    /// [`Self::kernel_for`]'s `smem_bytes`).
    pub fn smem_bytes(&self) -> u32 {
        self.kernel(Dtype::Bf16).smem_bytes()
    }
}

/// A split plan for one decode step: which pages each CTA handles, and the buffers for the
/// partial results. Computed on the GPU from the device seqlens (no host sync), reusable for
/// every layer of the step, and re-planned in place for the next step
/// ([`Decoder::replan`]: no allocation, so it can be captured in a CUDA graph).
///
/// A plan is used on one stream at a time (its merge counters and partial buffers are
/// per call). It may be moved and shared between threads (`Send + Sync`): its host state (the
/// tensor-map slots) sits behind a mutex.
///
/// CUDA graphs: a captured `decode` replays correctly any number of times, with new q and
/// seqlens written into the same buffers between replays (re-plan inside the captured region,
/// or before each replay). Nothing the host counts is frozen into the graph: the merge's
/// counters reset themselves on the device. The plan must outlive every graph that used it.
pub struct Plan {
    pub(crate) shape: DecodeShape,
    pub(crate) tiling: ColumnTiling,
    pub(crate) parts: u32,
    /// The context the plan's buffers belong to: a decode on a stream of another is an error.
    pub(crate) ctx: usize,
    pub(crate) ranges: DeviceBuffer<u32>,
    pub(crate) split_offsets: DeviceBuffer<u32>,
    pub(crate) o_accum: DeviceBuffer<f32>,
    pub(crate) lse_accum: DeviceBuffer<f32>,
    /// The split merge's counters, `[b][column groups]`, zeroed once: each call's publishes and
    /// merges bring each back to 0 (kernels/src/merge.rs).
    pub(crate) counters: DeviceBuffer<u32>,
    /// Tensor maps of q and the cache, a pair per slot, uploaded once per (q, cache) address
    /// pair: a model's layers each have their own cache, and steady-state calls then copy
    /// nothing to the device.
    pub(crate) maps: DeviceBuffer<DeviceMap>,
    pub(crate) slots: Mutex<MapSlots>,
}

/// The host's record of a plan's tensor-map slots.
pub(crate) struct MapSlots {
    /// `pairs[i]`: the (q, cache) addresses slot i was encoded for.
    pairs: Vec<(u64, u64)>,
    /// Slot i's maps are on the device in stream order (uploaded by an eager call). A slot
    /// uploaded only inside a captured graph is not: an eager call uploads it again.
    resident: Vec<bool>,
    /// Slot i is read by a captured graph: never re-assigned (the graph would read another
    /// pair's maps).
    in_graph: Vec<bool>,
    /// The next slot to re-assign once all are taken (round robin).
    next: usize,
    /// Page-locked copies of the maps that captured graphs upload (a graph's copy reads its
    /// source at every replay; slot i's entries never change once it is in a graph).
    pinned: PinnedBuffer<TensorMap>,
}

impl Plan {
    /// A plan's buffers for `shape` tiled as `tiling` over `parts` CTAs per column group, its
    /// merge counters zeroed in stream order on `stream` (the scheduler has not run yet).
    ///
    /// # Safety
    /// `stream` is a live stream of the current context (or null).
    pub(crate) unsafe fn allocate(
        shape: &DecodeShape,
        tiling: ColumnTiling,
        parts: u32,
        stream: CUstream,
    ) -> Result<Plan> {
        let splits = max_splits(shape.batch, parts as usize);
        let cols = shape.cols();
        // SAFETY (all five): device allocations of plain numbers that the kernels fully
        // write before reading (ranges and offsets by the scheduler; the accumulators only in
        // the slots the plan assigns, each written by the decode kernel before its split merge
        // reads it, after the merge counter says so; the maps before any decode reads them).
        let ranges = DeviceBuffer::<u32>::uninitialized(parts as usize * RANGE_WORDS)?;
        let split_offsets = DeviceBuffer::<u32>::uninitialized(shape.batch + 1)?;
        let o_accum = DeviceBuffer::<f32>::uninitialized(splits * cols * D_V)?;
        let lse_accum = DeviceBuffer::<f32>::uninitialized(splits * cols)?;
        let maps = DeviceBuffer::<DeviceMap>::uninitialized(2 * MAP_SLOTS)?;
        let counters = DeviceBuffer::<u32>::uninitialized(shape.batch * tiling.groups as usize)?;
        // SAFETY: zeroes the plan's own counters (4 bytes each), in stream order before any
        // decode call with this plan.
        driver::fill_u32_async(counters.as_device_ptr().as_raw(), 0, counters.len(), stream)?;
        Ok(Plan {
            shape: *shape,
            tiling,
            parts,
            ctx: driver::stream_context(stream)? as usize,
            ranges,
            split_offsets,
            o_accum,
            lse_accum,
            counters,
            maps,
            slots: Mutex::new(MapSlots {
                pairs: Vec::new(),
                resident: Vec::new(),
                in_graph: Vec::new(),
                next: 0,
                pinned: PinnedBuffer::zeroed(2 * MAP_SLOTS)?,
            }),
        })
    }

    pub fn shape(&self) -> &DecodeShape {
        &self.shape
    }
    pub fn tiling(&self) -> ColumnTiling {
        self.tiling
    }
    /// CTAs per column group (the scheduler's parts).
    pub fn parts(&self) -> u32 {
        self.parts
    }
    /// Copy the plan's split offsets to the host (`batch + 1` entries). A synchronous copy on
    /// the legacy default stream: synchronize the plan's stream first when it is a
    /// non-blocking one.
    pub fn split_offsets(&self) -> Result<Vec<u32>> {
        let mut v = vec![0u32; self.split_offsets.len()];
        self.split_offsets.copy_to(&mut v[..])?;
        Ok(v)
    }
    /// Copy the work ranges to the host (as [`Plan::split_offsets`]).
    pub fn ranges(&self) -> Result<Vec<etap_core::WorkRange>> {
        let mut v = vec![0u32; self.ranges.len()];
        self.ranges.copy_to(&mut v[..])?;
        Ok(v.chunks_exact(RANGE_WORDS)
            .map(|w| etap_core::WorkRange {
                begin_req: w[0],
                begin_tile: w[1],
                end_req: w[2],
                end_tile: w[3],
                first_split: w[4],
                empty: w[5],
                _pad: [0; 2],
            })
            .collect())
    }

    /// The device address of the tensor maps for (q, cache) at `q_addr`/`kv_addr`, uploading them
    /// into a slot when no slot holds them yet (eagerly, or as a copy in the graph being
    /// captured on `stream`).
    ///
    /// # Safety
    /// `stream` is a live stream of the plan's context.
    pub(crate) unsafe fn maps_for(&self, q_addr: u64, kv_addr: u64, stream: CUstream) -> Result<u64> {
        let capturing = driver::is_capturing(stream)?;
        let mut sl = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (q_addr, kv_addr);
        let slot = match sl.pairs.iter().position(|&p| p == pair) {
            Some(i) => i,
            None => {
                let i = if sl.pairs.len() < MAP_SLOTS {
                    sl.pairs.push(pair);
                    sl.resident.push(false);
                    sl.in_graph.push(false);
                    sl.pairs.len() - 1
                } else {
                    let i = (0..MAP_SLOTS)
                        .map(|k| (sl.next + k) % MAP_SLOTS)
                        .find(|&k| !sl.in_graph[k])
                        .ok_or_else(|| EtapError::Invalid {
                            arg: "q/kv_cache",
                            why: format!(
                                "all {MAP_SLOTS} tensor-map slots of this plan are read by captured graphs; \
                                 use another plan for more (q, kv_cache) pairs"
                            ),
                        })?;
                    sl.next = (i + 1) % MAP_SLOTS;
                    sl.pairs[i] = pair;
                    sl.resident[i] = false;
                    i
                };
                i
            }
        };
        let base = self.maps.as_device_ptr().as_raw() + (2 * slot * std::mem::size_of::<TensorMap>()) as u64;
        if capturing {
            if !sl.resident[slot] {
                // The graph uploads the maps itself, from page-locked memory that stays as it is
                // while the slot is in a graph: every replay then finds them, whatever ran
                // before it.
                let maps = self.encode_maps(q_addr, kv_addr)?;
                sl.pinned.set(2 * slot, maps[0]);
                sl.pinned.set(2 * slot + 1, maps[1]);
                // SAFETY: 256 bytes into pair slot `slot` of the plan's 2 * MAP_SLOTS maps, from
                // the plan's page-locked copy, which lives as long as the plan (and every graph
                // must not outlive the plan) and is not rewritten while the slot is in a graph.
                unsafe {
                    driver::copy_htod_async(
                        base,
                        sl.pinned.as_ptr(2 * slot) as *const c_void,
                        2 * std::mem::size_of::<TensorMap>(),
                        stream,
                    )?
                };
            }
            sl.in_graph[slot] = true;
        } else if !sl.resident[slot] {
            let maps = self.encode_maps(q_addr, kv_addr)?;
            // SAFETY: 256 bytes into pair slot `slot` of the plan's buffer, in stream order, so
            // kernels already enqueued that read the slot's old maps run first; a pageable source
            // is staged before the call returns, so `maps` may drop.
            unsafe {
                driver::copy_htod_async(
                    base,
                    maps.as_ptr() as *const c_void,
                    std::mem::size_of_val(&maps),
                    stream,
                )?
            };
            sl.resident[slot] = true;
        }
        Ok(base)
    }

    /// The tensor maps of q (`[b * cols, 576]` in boxes of the CTA's columns) and of the cache
    /// (`[num_pages * page_size, 576]` in boxes of a page or a tile, the smaller).
    fn encode_maps(&self, q_addr: u64, kv_addr: u64) -> Result<[TensorMap; 2]> {
        let shape = &self.shape;
        Ok([
            encode_2d(
                q_addr,
                shape.batch as u64 * shape.cols() as u64,
                D_QK as u64,
                self.tiling.cols_per_cta,
            )?,
            match shape.kv_format.fp8_row_bytes() {
                None => encode_2d(
                    kv_addr,
                    (shape.num_pages * shape.page_size) as u64,
                    D_QK as u64,
                    kv_box_rows(shape.page_size as u32),
                )?,
                // An FP8 cache: raw rows, `kv_page_stride_rows` a page (65 in FlashMLA's
                // quantizer's 656-byte layout), half a tile a box.
                Some(row_bytes) => encode_rows(
                    kv_addr,
                    (shape.num_pages * shape.kv_page_stride_rows()) as u64,
                    row_bytes,
                    etap_core::contract::FP8_BOX_ROWS,
                )?,
            },
        ])
    }
}

/// Device addresses of one decode call's buffers (the raw entry point's arguments).
#[derive(Clone, Copy, Debug)]
pub struct RawBuffers {
    /// q `[b, s_q, h_q, 576]`, 16-byte aligned.
    pub q: u64,
    /// Paged cache `[num_pages, page_size, 576]`, 16-byte aligned.
    pub kv_cache: u64,
    /// `[b, max_pages]` i32.
    pub block_table: u64,
    /// `[b]` i32.
    pub cache_seqlens: u64,
    /// `[b, s_q, h_q, 512]`, the dtype of q, 8-byte aligned.
    pub out: u64,
    /// `[b, h_q, s_q]` f32.
    pub lse: u64,
    /// The packed query layout's token offsets, `[b + 1]` i32 (`DecodeShape::with_packed_q`;
    /// q, out and lse then have its layout); 0 for the uniform layout.
    pub q_offsets: u64,
}

impl RawBuffers {
    /// The alignment in bytes each address needs (`q, kv_cache, block_table, cache_seqlens, out,
    /// lse`): the widest access the kernels make to it (the copy engine reads q and the cache in
    /// 16-byte units, the split merge writes out in 8-byte stores, lse, the block table and the
    /// seqlens are 4-byte words).
    pub const ALIGN: [u64; 6] = [16, 16, 4, 4, 8, 4];

    /// Check every address against [`RawBuffers::ALIGN`], naming the first misaligned one by
    /// `names` (the same order: the caller's names for the arguments).
    pub fn check_alignment(&self, names: [&'static str; 6]) -> Result<()> {
        let addrs = [
            self.q,
            self.kv_cache,
            self.block_table,
            self.cache_seqlens,
            self.out,
            self.lse,
        ];
        for ((arg, align), addr) in names.into_iter().zip(Self::ALIGN).zip(addrs) {
            if addr % align != 0 {
                return Err(EtapError::Misaligned { arg, align, addr });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(s_q: usize, h_q: usize) -> DecodeShape {
        DecodeShape::new(4, s_q, h_q, 8, 2)
    }

    #[test]
    fn layout_follows_the_column_count() {
        for (s_q, h_q, want) in [
            (1, 8, Layout::KvOnM),
            (1, 16, Layout::KvOnM),
            (1, 1, Layout::KvOnM),
            (5, 3, Layout::KvOnM),
            (3, 8, Layout::HeadsOnM),
            (1, 17, Layout::HeadsOnM),
            (1, 20, Layout::HeadsOnM),
            (3, 6, Layout::HeadsOnM),
            (2, 16, Layout::HeadsOnM),
            (1, 32, Layout::HeadsOnM),
            (3, 16, Layout::HeadsOnM),
            (4, 16, Layout::HeadsOnM),
            (1, 64, Layout::HeadsOnM),
            (3, 32, Layout::HeadsOnM),
            (1, 128, Layout::HeadsOnM),
            (4, 128, Layout::HeadsOnM),
        ] {
            assert_eq!(Layout::for_shape(&shape(s_q, h_q)), want, "s_q={s_q} h_q={h_q}");
            // An FP8 cache: KV on M up to 32 columns, heads on M from FP8_WIDE_MIN_COLS.
            for f in [KvFormat::Fp8Flashmla656, KvFormat::Fp8PerTensor] {
                let sh = shape(s_q, h_q).with_kv_format(f);
                let want = if s_q * h_q >= FP8_WIDE_MIN_COLS {
                    Layout::HeadsOnM
                } else {
                    Layout::KvOnM
                };
                assert_eq!(Layout::for_shape(&sh), want, "{f:?} s_q={s_q} h_q={h_q}");
            }
        }
    }

    #[test]
    fn fp8_tilings_are_groups_of_16_or_32() {
        for f in [KvFormat::Fp8Flashmla656, KvFormat::Fp8PerTensor] {
            for (s_q, h_q, cols_per_cta, groups) in [
                (1, 1, 16, 1),
                (1, 16, 16, 1),
                (1, 17, 32, 1),
                (2, 16, 32, 1),
                (4, 8, 32, 1),
                (1, 32, 32, 1),
                (1, 64, 32, 2),
                (1, 128, 32, 4),
                (3, 6, 32, 1),
                (3, 16, 32, 2),
                (8, 128, 32, 32),
            ] {
                let sh = shape(s_q, h_q).with_kv_format(f);
                // The KV-on-M tiling (the plan's layout for these below FP8_WIDE_MIN_COLS;
                // `plan_with_layout` takes it at every count).
                let t = ColumnTiling::for_shape(&sh, Layout::KvOnM);
                assert_eq!(
                    t,
                    ColumnTiling {
                        layout: Layout::KvOnM,
                        cols_per_cta,
                        groups
                    },
                    "{f:?} s_q={s_q} h_q={h_q}"
                );
                for dtype in [Dtype::Bf16, Dtype::F16] {
                    let k = t.kernel_for(dtype, f).unwrap();
                    assert!(matches!(k, Kernel::DecodeFp8 { cols, .. } if KV_ON_M_COLS[cols] == cols_per_cta));
                    assert!(k.smem_bytes() <= etap_core::contract::MAX_SMEM);
                }
                // Heads on M, when asked for, runs the wide FP8 kernel.
                let wide = ColumnTiling::for_shape(&sh, Layout::HeadsOnM);
                let k = wide.kernel_for(Dtype::F16, f).unwrap();
                assert_eq!(
                    k,
                    Kernel::WideFp8 {
                        row_bytes: f.fp8_row_bytes().unwrap(),
                        f16: true
                    }
                );
                assert_eq!(k.smem_bytes(), wide.smem_bytes());
            }
        }
    }

    #[test]
    fn tilings_cover_every_column_once_and_fit_shared_memory() {
        // A CTA may have 227 KiB of dynamic shared memory on sm_90.
        const MAX_SMEM: u32 = 227 * 1024;
        for s_q in 1..=4 {
            for h_q in [8, 16, 32, 64, 128] {
                let sh = shape(s_q, h_q);
                for layout in [Layout::KvOnM, Layout::HeadsOnM] {
                    let t = ColumnTiling::for_shape(&sh, layout);
                    let n = sh.cols() as u32;
                    assert!(t.groups * t.cols_per_cta >= n, "{layout:?} s_q={s_q} h_q={h_q}");
                    assert!((t.groups - 1) * t.cols_per_cta < n, "{layout:?}: an empty column group");
                    assert!(t.cols_per_cta <= COLS_PER_CTA as u32 && t.cols_per_cta.is_multiple_of(16));
                    if layout == Layout::KvOnM {
                        assert!(t.cols_per_cta <= KV_ON_M_MAX_COLS);
                    }
                    assert!(t.smem_bytes() <= MAX_SMEM, "{layout:?} needs {} bytes", t.smem_bytes());
                }
            }
        }
    }
}
