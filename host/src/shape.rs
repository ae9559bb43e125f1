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
    /// What the cache's rows are: 16-bit like q (the default), or one of the FP8 formats.
    pub kv_format: KvFormat,
    /// An FP8 cache's rows from one page's first row to the next's, where they are not its
    /// format's ([`KvFormat::page_stride_rows`]: 65 for FlashMLA's quantizer's 656-byte layout,
    /// 64 for the per-tensor one): e.g. 64 for a contiguous `[num_pages, 64, 656]` cache, as
    /// vLLM allocates FlashMLA's format. At least `page_size`; `None` for a 16-bit cache.
    pub kv_page_stride: Option<usize>,
}

/// The KV cache's row format (issue 14). The FP8 formats are read by the ETAP kernel of 16 or 32
/// columns, a request of more columns by the wide FP8 kernel (heads on M, 64 columns a CTA,
/// `plan::FP8_WIDE_MIN_COLS`) or, when a plan asks for KV on M, in column groups of 32, with
/// bf16 or fp16 q and out and pages of 64 rows; they are given to `Decoder::decode_fp8_into` as
/// bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KvFormat {
    /// The dtype of q (bf16 or fp16), `[num_pages, page_size, 576]`.
    #[default]
    Elem16,
    /// FlashMLA's "FP8 with scale": per row 512 e4m3, 4 f32 scales (one per 128 values), 64
    /// bf16; pages of 64 rows 65 rows apart (`crate::fp8::FP8_656_PAGE_STRIDE` bytes).
    Fp8Flashmla656,
    /// 576 e4m3 a row and one f32 scale for the cache (given at the call), `[num_pages, 64, 576]`.
    Fp8PerTensor,
}

impl KvFormat {
    /// Bytes of one cache row in the FP8 formats (None: 16-bit).
    pub fn fp8_row_bytes(self) -> Option<u32> {
        match self {
            KvFormat::Elem16 => None,
            KvFormat::Fp8Flashmla656 => Some(etap_core::contract::FP8_656_ROW_BYTES),
            KvFormat::Fp8PerTensor => Some(etap_core::contract::FP8_TENSOR_ROW_BYTES),
        }
    }
    /// Cache rows from one page's first row to the next's in this format's own layout (a shape
    /// may set another: [`DecodeShape::with_kv_page_stride`]).
    pub fn page_stride_rows(self, page_size: usize) -> usize {
        match self {
            KvFormat::Fp8Flashmla656 => crate::fp8::FP8_656_PAGE_STRIDE / crate::fp8::FP8_656_TOKEN_BYTES,
            _ => page_size,
        }
    }
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
            kv_format: KvFormat::Elem16,
            kv_page_stride: None,
        }
    }
    /// The same shape with the cache in `kv_format`.
    pub fn with_kv_format(self, kv_format: KvFormat) -> Self {
        DecodeShape { kv_format, ..self }
    }
    /// The same shape with an FP8 cache's pages `rows` rows apart (see the field
    /// [`DecodeShape::kv_page_stride`]).
    pub fn with_kv_page_stride(self, rows: usize) -> Self {
        DecodeShape {
            kv_page_stride: Some(rows),
            ..self
        }
    }
    /// Cache rows from one page's first row to the next's: [`DecodeShape::kv_page_stride`], or
    /// the format's.
    pub fn kv_page_stride_rows(&self) -> usize {
        self.kv_page_stride
            .unwrap_or(self.kv_format.page_stride_rows(self.page_size))
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
    /// The cache's length: elements of q's dtype, or bytes for an FP8 format.
    pub fn cache_len(&self) -> usize {
        match self.kv_format.fp8_row_bytes() {
            None => self.num_pages * self.page_size * self.d_qk,
            Some(row) => self.num_pages * self.kv_page_stride_rows() * row as usize,
        }
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
