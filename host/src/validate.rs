//! Input checks shared by the GPU path and the CPU reference. Every function is pure and
//! reports the first problem it finds as an [`EtapError`] naming the argument at fault.
use crate::error::{EtapError, Result};
use crate::shape::DecodeShape;
use etap_core::{D_QK, D_V, MAX_HEADS, MAX_S_Q, PAGE_SIZES};

/// Check the shape itself: a non-empty batch, the MLA head dimensions (576 / 512), a supported
/// head count, query length and page size, and a cache and block table with at least one page.
pub fn validate_shape(shape: &DecodeShape) -> Result<()> {
    if shape.batch == 0 {
        return Err(EtapError::EmptyBatch);
    }
    if shape.d_qk != D_QK {
        return Err(EtapError::HeadDim {
            arg: "q/cache head dim",
            expected: D_QK,
            got: shape.d_qk,
        });
    }
    if shape.d_v != D_V {
        return Err(EtapError::HeadDim {
            arg: "v head dim",
            expected: D_V,
            got: shape.d_v,
        });
    }
    if !(1..=MAX_HEADS).contains(&shape.h_q) {
        return Err(EtapError::UnsupportedHeads { h_q: shape.h_q });
    }
    if !(1..=MAX_S_Q).contains(&shape.s_q) {
        return Err(EtapError::UnsupportedSeqQ { s_q: shape.s_q });
    }
    if !PAGE_SIZES.contains(&shape.page_size) {
        return Err(EtapError::UnsupportedPageSize {
            page_size: shape.page_size,
        });
    }
    // FP8 caches: pages of 64 rows (the FP8 kernels' tile is one page). Any column count: past
    // 32, the plan runs heads on M (the wide FP8 kernel, `plan::FP8_WIDE_MIN_COLS`), or the FP8
    // kernel of 32 columns over column groups when asked for (`plan::FP8_MAX_COLS_PER_CTA`).
    if shape.kv_format != crate::KvFormat::Elem16 && shape.page_size != 64 {
        return Err(EtapError::Invalid {
            arg: "kv_format",
            why: format!("FP8 caches take pages of 64 rows, not {}", shape.page_size),
        });
    }
    // Another page stride: an FP8 cache's (the kernels address its rows through the tensor map
    // and `DecodeParams::kv_stride`; a 16-bit cache's map is pages of `page_size` rows), and
    // pages that do not overlap.
    if let Some(rows) = shape.kv_page_stride {
        if shape.kv_format == crate::KvFormat::Elem16 {
            return Err(EtapError::Invalid {
                arg: "kv_page_stride",
                why: format!("a 16-bit cache's pages are page_size rows apart; {rows} is for an FP8 cache"),
            });
        }
        if rows < shape.page_size {
            return Err(EtapError::Invalid {
                arg: "kv_page_stride",
                why: format!(
                    "{rows} rows between pages of {} rows would overlap them",
                    shape.page_size
                ),
            });
        }
    }
    if shape.packed_q == Some(0) {
        return Err(EtapError::Zero { arg: "total_q" });
    }
    if let Some(total) = shape.packed_q {
        if total > shape.batch.saturating_mul(shape.s_q) {
            return Err(EtapError::Invalid {
                arg: "total_q",
                why: format!(
                    "{total} tokens for {} requests of at most s_q = {} each",
                    shape.batch, shape.s_q
                ),
            });
        }
    }
    if shape.num_pages == 0 {
        return Err(EtapError::Zero { arg: "num_pages" });
    }
    if shape.max_pages == 0 {
        return Err(EtapError::Zero { arg: "max_pages" });
    }
    // The kernels address cache rows and query rows with the copy engine's signed 32-bit
    // coordinates (a block-table entry outside the cache reads the page one past it, so that
    // page's rows count too), and a request's rows with u32.
    for (arg, rows) in [
        (
            "num_pages",
            shape
                .num_pages
                .saturating_add(1)
                .saturating_mul(shape.kv_page_stride_rows()),
        ),
        ("max_pages", shape.max_pages.saturating_mul(shape.page_size)),
        ("batch * s_q * h_q", shape.batch.saturating_mul(shape.s_q * shape.h_q)),
        ("total_q * h_q", shape.q_tokens().saturating_mul(shape.h_q)),
    ] {
        if rows > MAX_ROWS {
            return Err(EtapError::TooLarge {
                arg,
                max: MAX_ROWS,
                got: rows,
            });
        }
    }
    Ok(())
}

/// Most rows a tensor the kernels address may have: cache rows (`(num_pages + 1) * page_size`),
/// a request's rows (`max_pages * page_size`) and query rows (`batch * s_q * h_q`) are TMA
/// coordinates, i32.
pub const MAX_ROWS: usize = i32::MAX as usize;

fn check_len(arg: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(EtapError::Length { arg, expected, got })
    }
}

/// Check that every buffer has the length the shape asks for, in argument order: `q`,
/// `kv_cache`, `block_table`, `cache_seqlens`, `out`, `lse`.
pub fn validate_lengths(
    shape: &DecodeShape,
    q_len: usize,
    cache_len: usize,
    block_table_len: usize,
    seqlens_len: usize,
    out_len: usize,
    lse_len: usize,
) -> Result<()> {
    check_len("q", shape.q_len(), q_len)?;
    check_len("kv_cache", shape.cache_len(), cache_len)?;
    check_len("block_table", shape.block_table_len(), block_table_len)?;
    check_len("cache_seqlens", shape.batch, seqlens_len)?;
    check_len("out", shape.out_len(), out_len)?;
    check_len("lse", shape.lse_len(), lse_len)?;
    Ok(())
}

/// Check the sequence lengths and the used part of the block table, request by request: each
/// length must be in `[0, max_pages * page_size]`, and each entry in the slots the request
/// uses (`[0, ceil(seqlen / page_size))`) must be a page of the cache, `[0, num_pages)`. Slots past a
/// request's used pages are never read and may hold anything.
///
/// `block_table` and `seqlens` must have the shape's lengths (see [`validate_lengths`]); a
/// mismatch is reported as [`EtapError::Length`] rather than a panic.
pub fn validate_tables(shape: &DecodeShape, block_table: &[i32], seqlens: &[i32]) -> Result<()> {
    check_len("block_table", shape.block_table_len(), block_table.len())?;
    check_len("cache_seqlens", shape.batch, seqlens.len())?;
    let capacity = shape.capacity();
    for (request, &seqlen) in seqlens.iter().enumerate() {
        if seqlen < 0 {
            return Err(EtapError::NegativeSeqlen { request, seqlen });
        }
        if seqlen as usize > capacity {
            return Err(EtapError::SeqlenBeyondTable {
                request,
                seqlen,
                capacity,
            });
        }
        let used = (seqlen as usize).div_ceil(shape.page_size);
        let row = &block_table[request * shape.max_pages..][..used];
        for (slot, &page) in row.iter().enumerate() {
            if page < 0 || page as usize >= shape.num_pages {
                return Err(EtapError::BlockTableEntry {
                    request,
                    slot,
                    page,
                    num_pages: shape.num_pages,
                });
            }
        }
    }
    Ok(())
}

/// Check the packed layout's token offsets (`q_offsets`, `batch + 1` of them): they start at 0,
/// never decrease, end at `total_q`, and give no request more than `s_q` tokens. On the
/// device, offsets that break this are clamped (each request's rows stay inside q, out and
/// lse), and the result is as documented in docs/design.md ("Bounds safety").
pub fn validate_q_offsets(shape: &DecodeShape, q_offsets: &[i32]) -> Result<()> {
    let Some(total) = shape.packed_q else {
        return Err(EtapError::Invalid {
            arg: "q_offsets",
            why: "given for a shape without the packed query layout".into(),
        });
    };
    check_len("q_offsets", shape.batch + 1, q_offsets.len())?;
    let bad = |why: String| Err(EtapError::Invalid { arg: "q_offsets", why });
    if q_offsets[0] != 0 {
        return bad(format!("q_offsets[0] = {} (must be 0)", q_offsets[0]));
    }
    for r in 0..shape.batch {
        let (a, b) = (q_offsets[r], q_offsets[r + 1]);
        if b < a || (b - a) as usize > shape.s_q {
            return bad(format!(
                "request {r} has q_offsets[{r}..={}] = {a}..{b}: between 0 and s_q = {} tokens needed",
                r + 1,
                shape.s_q
            ));
        }
    }
    if q_offsets[shape.batch] as usize != total {
        return bad(format!(
            "q_offsets[{}] = {} (must be total_q = {total})",
            shape.batch, q_offsets[shape.batch]
        ));
    }
    Ok(())
}

/// All the checks of a decode call, in order: shape, lengths, then tables.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_all<T>(
    shape: &DecodeShape,
    q: &[T],
    cache: &[T],
    block_table: &[i32],
    seqlens: &[i32],
    out_len: usize,
    lse_len: usize,
) -> Result<()> {
    validate_shape(shape)?;
    validate_lengths(
        shape,
        q.len(),
        cache.len(),
        block_table.len(),
        seqlens.len(),
        out_len,
        lse_len,
    )?;
    validate_tables(shape, block_table, seqlens)
}
