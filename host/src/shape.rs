//! The shape of one decode step, in FlashMLA's terms.
use etap_core::{D_QK, D_V};

/// Shape of a decode step:
/// - q: `[batch, s_q, h_q, d_qk]`
/// - paged cache: `[num_pages, page_size, 1, d_qk]` (one latent KV head; V = first `d_v`
///   columns); `page_size` one of `etap_core::PAGE_SIZES`, 64 unless set
/// - block_table: `[batch, max_pages]` i32
/// - cache_seqlens: `[batch]` i32
/// - out: `[batch, s_q, h_q, d_v]`, lse: `[batch, h_q, s_q]` f32
///
/// or, in the packed query layout ([`DecodeShape::with_packed_q`]), request `r` has its own
/// token count, at most `s_q`, given on the device by offsets `q_offsets[batch + 1]`
/// (`cu_seqlens_q`: its tokens are rows `q_offsets[r]..q_offsets[r + 1]`):
/// - q: `[total_q, h_q, d_qk]`, out: `[total_q, h_q, d_v]`, lse: `[total_q, h_q]` f32
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeShape {
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    /// Head dimension of q and the cache rows: must be 576.
    pub d_qk: usize,
    /// Head dimension of V and out: must be 512.
    pub d_v: usize,
    /// Pages in the paged cache.
    pub num_pages: usize,
    /// Width of the block table: pages per request at most.
    pub max_pages: usize,
    /// Rows of a cache page (16, 32, 64 or 128); the block table's entries are pages of this
    /// many rows.
    pub page_size: usize,
    /// The packed query layout's token count (`Some(total_q)`); `None`: `s_q` tokens a request.
    pub packed_q: Option<usize>,
}

/// The page size of [`DecodeShape::new`]: FlashMLA's.
pub const DEFAULT_PAGE_SIZE: usize = 64;

impl DecodeShape {
    /// A shape with the MLA head dimensions (576, 512) and pages of [`DEFAULT_PAGE_SIZE`] rows.
    pub fn new(batch: usize, s_q: usize, h_q: usize, num_pages: usize, max_pages: usize) -> Self {
        DecodeShape {
            batch,
            s_q,
            h_q,
            d_qk: D_QK,
            d_v: D_V,
            num_pages,
            max_pages,
            page_size: DEFAULT_PAGE_SIZE,
            packed_q: None,
        }
    }
    /// The same shape in the packed query layout: `total_q` tokens in all, each request at
    /// most `s_q` of them (see the type's documentation).
    pub fn with_packed_q(self, total_q: usize) -> Self {
        DecodeShape {
            packed_q: Some(total_q),
            ..self
        }
    }
    /// Query tokens of the batch: rows of q, out and lse (`batch * s_q`, or the packed count).
    pub fn q_tokens(&self) -> usize {
        self.packed_q.unwrap_or(self.batch * self.s_q)
    }
    /// The same shape with pages of `page_size` rows.
    pub fn with_page_size(self, page_size: usize) -> Self {
        DecodeShape { page_size, ..self }
    }
    /// (token, head) columns per request: `s_q * h_q`.
    pub fn cols(&self) -> usize {
        self.s_q * self.h_q
    }
    pub fn q_len(&self) -> usize {
        self.q_tokens() * self.h_q * self.d_qk
    }
    pub fn cache_len(&self) -> usize {
        self.num_pages * self.page_size * self.d_qk
    }
    pub fn block_table_len(&self) -> usize {
        self.batch * self.max_pages
    }
    pub fn out_len(&self) -> usize {
        self.q_tokens() * self.h_q * self.d_v
    }
    pub fn lse_len(&self) -> usize {
        self.q_tokens() * self.h_q
    }
    /// Rows the block table can hold per request.
    pub fn capacity(&self) -> usize {
        self.max_pages * self.page_size
    }
    /// KV tiles (the kernels' 64-row unit) of a request at most: [`Self::capacity`] rounded up.
    pub fn max_tiles(&self) -> usize {
        self.capacity().div_ceil(etap_core::TILE_ROWS)
    }
}
