//! The one error type of the host API.
use std::fmt;

/// Everything that can go wrong, each naming the argument at fault. Input errors are reported
/// before any launch, and nothing is written to the caller's buffers then.
#[derive(Debug, Clone, PartialEq)]
pub enum EtapError {
    /// The batch has no requests.
    EmptyBatch,
    /// A head dimension other than the MLA ones (576 for q/K, 512 for V/out).
    HeadDim {
        arg: &'static str,
        expected: usize,
        got: usize,
    },
    /// `h_q` outside `1..=etap_core::MAX_HEADS`.
    UnsupportedHeads { h_q: usize },
    /// `s_q` outside `1..=etap_core::MAX_S_Q`.
    UnsupportedSeqQ { s_q: usize },
    /// A cache page size other than `etap_core::PAGE_SIZES`.
    UnsupportedPageSize { page_size: usize },
    /// A buffer whose length does not match the shape.
    Length {
        arg: &'static str,
        expected: usize,
        got: usize,
    },
    /// A size past what the kernels can address (32-bit row coordinates).
    TooLarge { arg: &'static str, max: usize, got: usize },
    /// A shape field that must be positive is zero (pages in the cache, block-table width).
    Zero { arg: &'static str },
    /// A negative sequence length.
    NegativeSeqlen { request: usize, seqlen: i32 },
    /// A sequence length longer than the request's block table can hold.
    SeqlenBeyondTable {
        request: usize,
        seqlen: i32,
        capacity: usize,
    },
    /// A block-table entry (within the request's used pages) outside the cache.
    BlockTableEntry {
        request: usize,
        slot: usize,
        page: i32,
        num_pages: usize,
    },
    /// A request index past the batch (for the per-request reference).
    RequestIndex { request: usize, batch: usize },
    /// A raw device address not aligned as the kernels need (`decode_raw`).
    Misaligned { arg: &'static str, align: u64, addr: u64 },
    /// An argument with a value the call cannot take, and why (a softmax scale that is not
    /// finite and positive, a stream of another context than the plan's, ...).
    Invalid { arg: &'static str, why: String },
    /// The machine has no CUDA device.
    NoDevice,
    /// A device-side failure with its message: a device that is not Hopper (compute capability
    /// 9.x), a PTX that does not load, a failed launch or tensor-map encoding.
    Device(String),
    /// A CUDA driver call failed.
    Cuda(cust::error::CudaError),
}

impl fmt::Display for EtapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use EtapError::*;
        match self {
            EmptyBatch => write!(f, "empty batch: batch must be at least 1"),
            HeadDim { arg, expected, got } => {
                write!(f, "{arg}: head dimension {got} is not supported (MLA needs {expected})")
            }
            UnsupportedHeads { h_q } => write!(
                f,
                "h_q = {h_q} is not supported (supported: 1 to {})",
                etap_core::MAX_HEADS
            ),
            UnsupportedPageSize { page_size } => write!(
                f,
                "page_size = {page_size} rows is not supported (supported: {:?})",
                etap_core::PAGE_SIZES
            ),
            UnsupportedSeqQ { s_q } => {
                write!(
                    f,
                    "s_q = {s_q} is not supported (supported: 1 to {})",
                    etap_core::MAX_S_Q
                )
            }
            Length { arg, expected, got } => write!(f, "{arg}: expected {expected} elements for this shape, got {got}"),
            Zero { arg } => write!(f, "{arg} must be positive"),
            TooLarge { arg, max, got } => write!(f, "{arg}: {got} rows exceed the kernels' limit of {max}"),
            NegativeSeqlen { request, seqlen } => {
                write!(f, "cache_seqlens[{request}] = {seqlen} is negative")
            }
            SeqlenBeyondTable {
                request,
                seqlen,
                capacity,
            } => {
                write!(
                    f,
                    "cache_seqlens[{request}] = {seqlen} exceeds the block table's capacity of {capacity} rows"
                )
            }
            BlockTableEntry {
                request,
                slot,
                page,
                num_pages,
            } => {
                write!(
                    f,
                    "block_table[{request}][{slot}] = {page} is outside the cache's {num_pages} pages"
                )
            }
            RequestIndex { request, batch } => {
                write!(f, "request {request} is out of range for a batch of {batch}")
            }
            Misaligned { arg, align, addr } => {
                write!(f, "{arg} at {addr:#x} must be {align}-byte aligned")
            }
            Invalid { arg, why } => write!(f, "{arg}: {why}"),
            NoDevice => write!(f, "no CUDA device"),
            Device(msg) => write!(f, "device: {msg}"),
            Cuda(e) => write!(f, "CUDA error: {e}"),
        }
    }
}

impl std::error::Error for EtapError {}

impl From<cust::error::CudaError> for EtapError {
    fn from(e: cust::error::CudaError) -> Self {
        EtapError::Cuda(e)
    }
}

/// Result with [`EtapError`].
pub type Result<T> = std::result::Result<T, EtapError>;
