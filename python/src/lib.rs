//! `etap._etap`: the native half of the `etap` Python package. Deliberately thin: the Python
//! layer (python/etap/) reads the tensors' attributes, checks dtypes, devices, shapes and
//! strides, and passes plain integers here (device addresses, sizes, the stream handle), so the
//! wheel links neither libtorch nor libpython and works with any torch version.
use etap::interop::{capture_id, check_alignment, check_stream, ContextGuard};
use etap::{fp8, Bf16, DecodeShape, Dtype, Element, EtapError, KvFormat, RawBuffers};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::Arc;

/// Input errors (the caller's arguments) become ValueError, the rest RuntimeError; the message
/// is etap's, which names the argument.
fn to_py(e: EtapError) -> PyErr {
    use EtapError::*;
    match e {
        EmptyBatch
        | HeadDim { .. }
        | UnsupportedHeads { .. }
        | UnsupportedSeqQ { .. }
        | UnsupportedPageSize { .. }
        | Length { .. }
        | TooLarge { .. }
        | Zero { .. }
        | NegativeSeqlen { .. }
        | SeqlenBeyondTable { .. }
        | BlockTableEntry { .. }
        | RequestIndex { .. }
        | Misaligned { .. }
        | Invalid { .. } => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

fn dtype_of(name: &str) -> PyResult<Dtype> {
    match name {
        "bf16" | "bfloat16" => Ok(Dtype::Bf16),
        "f16" | "fp16" | "float16" => Ok(Dtype::F16),
        _ => Err(PyValueError::new_err(format!(
            "dtype: {name:?} is not supported (bf16 or fp16)"
        ))),
    }
}

/// The cache formats by their Python names: None (16-bit, q's dtype), "fp8_656" (FlashMLA's
/// FP8 with scale: 656 bytes a token, pages of 64 tokens 65 apart) and "fp8_per_tensor" (576
/// e4m3 a token, one float32 scale given at the call).
fn kv_format_of(name: Option<&str>) -> PyResult<KvFormat> {
    match name {
        None => Ok(KvFormat::Elem16),
        Some("fp8_656") => Ok(KvFormat::Fp8Flashmla656),
        Some("fp8_per_tensor") => Ok(KvFormat::Fp8PerTensor),
        Some(other) => Err(PyValueError::new_err(format!(
            "kv_format: {other:?} is not a cache format (None for 16-bit, \"fp8_656\" or \"fp8_per_tensor\")"
        ))),
    }
}

/// The Python name of a cache format (None: 16-bit).
fn kv_format_name(f: KvFormat) -> Option<&'static str> {
    match f {
        KvFormat::Elem16 => None,
        KvFormat::Fp8Flashmla656 => Some("fp8_656"),
        KvFormat::Fp8PerTensor => Some("fp8_per_tensor"),
    }
}

/// The decode shape, checked; `total_q` `Some`: the packed query layout (`s_q` is then the most
/// tokens a request may have, and `total_q` at most `batch * s_q`: more could not be split
/// into `batch` requests of at most `s_q` tokens). `kv_format`: see [`kv_format_of`]; an FP8
/// format takes pages of 64 rows (etap::validate; any `s_q * h_q`, past 32 heads on M), in
/// either query layout. `kv_page_stride`: an FP8 cache's rows from one page to the next where
/// not its format's (`DecodeShape::with_kv_page_stride`; at least 64).
#[allow(clippy::too_many_arguments)]
fn shape_of(
    batch: usize,
    s_q: usize,
    h_q: usize,
    num_pages: usize,
    max_pages: usize,
    page_size: usize,
    total_q: Option<usize>,
    kv_format: Option<&str>,
    kv_page_stride: Option<usize>,
) -> PyResult<DecodeShape> {
    let format = kv_format_of(kv_format)?;
    let mut shape = DecodeShape::new(batch, s_q, h_q, num_pages, max_pages)
        .with_page_size(page_size)
        .with_kv_format(format);
    if let Some(total_q) = total_q {
        shape = shape.with_packed_q(total_q);
    }
    if let Some(rows) = kv_page_stride {
        shape = shape.with_kv_page_stride(rows);
    }
    // Checks `total_q <= batch * s_q`, and the FP8 formats' page size, too.
    etap::validate::validate_shape(&shape).map_err(to_py)?;
    Ok(shape)
}

/// A softmax scale from Python: None (1/sqrt(576)) or finite and positive, also as f32.
fn softmax_scale_of(softmax_scale: Option<f64>) -> PyResult<Option<f32>> {
    match softmax_scale {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && (s as f32).is_finite() && (s as f32) > 0.0 => Ok(Some(s as f32)),
        Some(s) => Err(PyValueError::new_err(format!(
            "softmax_scale: {s} must be finite and positive"
        ))),
    }
}

/// Check a decode shape without a GPU: raises ValueError naming the field at fault.
/// `page_size`: the cache's rows per page (one of `PAGE_SIZES`); `total_q`: the packed query
/// layout's token count (`s_q` is then the most tokens a request has), None for the uniform one;
/// `kv_format`: None (a 16-bit cache), "fp8_656" or "fp8_per_tensor" (pages of 64 rows);
/// `kv_page_stride`: an FP8 cache's rows between pages where not its format's (None).
/// Returns the kernel layout a plan of the shape picks (`etap::Layout::for_shape`: "KvOnM" or
/// "HeadsOnM", as a plan's `layout` says it).
#[allow(clippy::too_many_arguments)]
#[pyfunction]
#[pyo3(signature = (batch, s_q, h_q, num_pages, max_pages, page_size, total_q=None, kv_format=None, kv_page_stride=None))]
fn validate_shape(
    batch: usize,
    s_q: usize,
    h_q: usize,
    num_pages: usize,
    max_pages: usize,
    page_size: usize,
    total_q: Option<usize>,
    kv_format: Option<&str>,
    kv_page_stride: Option<usize>,
) -> PyResult<String> {
    let shape = shape_of(
        batch,
        s_q,
        h_q,
        num_pages,
        max_pages,
        page_size,
        total_q,
        kv_format,
        kv_page_stride,
    )?;
    Ok(format!("{:?}", etap::Layout::for_shape(&shape)))
}

/// Check the buffer addresses (q, k_cache, block_table, cache_seqlens, out, lse, and the packed
/// layout's cu_seqlens_q where not 0) against the kernels' widest accesses: raises ValueError
/// naming the first misaligned one.
#[pyfunction]
#[pyo3(signature = (q, k_cache, block_table, cache_seqlens, out, lse, cu_seqlens_q=0))]
fn check_addresses(
    q: u64,
    k_cache: u64,
    block_table: u64,
    cache_seqlens: u64,
    out: u64,
    lse: u64,
    cu_seqlens_q: u64,
) -> PyResult<()> {
    check_alignment([q, k_cache, block_table, cache_seqlens, out, lse]).map_err(to_py)?;
    check_offsets_alignment(cu_seqlens_q)
}

/// `cu_seqlens_q` matches the plan's query layout (an address for a packed plan, 0 for a uniform
/// one) and, where given, is 4-byte aligned.
fn check_offsets_for(shape: &DecodeShape, cu_seqlens_q: u64) -> PyResult<()> {
    match (shape.packed_q, cu_seqlens_q) {
        (Some(total_q), 0) => Err(PyValueError::new_err(format!(
            "cu_seqlens_q: needed: the plan is for the packed query layout (total_q = {total_q})"
        ))),
        (None, a) if a != 0 => Err(PyValueError::new_err(
            "cu_seqlens_q: given, but the plan is for the uniform query layout (make one with total_q)",
        )),
        _ => check_offsets_alignment(cu_seqlens_q),
    }
}

/// `cu_seqlens_q` (int32 words, read by the kernels one at a time) is 4-byte aligned.
fn check_offsets_alignment(cu_seqlens_q: u64) -> PyResult<()> {
    if !cu_seqlens_q.is_multiple_of(4) {
        return Err(to_py(EtapError::Misaligned {
            arg: "cu_seqlens_q",
            align: 4,
            addr: cu_seqlens_q,
        }));
    }
    Ok(())
}

/// A decoder on one CUDA device: the device's primary context (PyTorch's) and the kernels.
#[pyclass(name = "Decoder", module = "etap._etap", frozen)]
struct PyDecoder {
    inner: Arc<Owned>,
}

/// An `etap::Decoder` dropped with its own context current (its module is unloaded from that
/// context, whatever context the dropping thread has current). It holds one more retain of the
/// device's primary context, released after the context is popped again, so the context is
/// never released while pushed.
struct Owned {
    decoder: std::mem::ManuallyDrop<etap::Decoder>,
    device: cust::sys::CUdevice,
}

impl Owned {
    fn new(decoder: etap::Decoder) -> Result<Self, EtapError> {
        let mut device: cust::sys::CUdevice = 0;
        let mut ctx: cust::sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the driver is initialized (the decoder exists) and the ordinal is the
        // decoder's; both write one value through valid pointers. The retain does not change
        // any thread's current context.
        let rc = unsafe {
            match cust::sys::cuDeviceGet(&mut device, decoder.device() as i32) {
                cust::sys::CUresult::CUDA_SUCCESS => cust::sys::cuDevicePrimaryCtxRetain(&mut ctx, device),
                e => e,
            }
        };
        if rc != cust::sys::CUresult::CUDA_SUCCESS {
            return Err(EtapError::Device(format!(
                "retaining the device's primary context failed: {rc:?}"
            )));
        }
        Ok(Owned {
            decoder: std::mem::ManuallyDrop::new(decoder),
            device,
        })
    }
}

impl std::ops::Deref for Owned {
    type Target = etap::Decoder;
    fn deref(&self) -> &etap::Decoder {
        &self.decoder
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        {
            let _guard = ContextGuard::new(&self.decoder);
            // SAFETY: dropped once, here; the field is not used after.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.decoder) };
        }
        // SAFETY: releases the retain taken in `new`, after the context was popped.
        unsafe { cust::sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

/// A split plan for one decode shape on one device (FlashMLA's tile-scheduler metadata, plus
/// the workspace its split merge uses). Re-planned in place for each step's seqlens.
#[pyclass(name = "Plan", module = "etap._etap")]
struct PyPlan {
    plan: Option<etap::Plan>,
    decoder: Arc<Owned>,
}

impl Drop for PyPlan {
    fn drop(&mut self) {
        // The plan's device buffers are freed in the decoder's context, whatever is current.
        if let Some(plan) = self.plan.take() {
            let _guard = ContextGuard::new(&self.decoder);
            drop(plan);
        }
    }
}

impl PyPlan {
    fn get(&self) -> PyResult<&etap::Plan> {
        self.plan
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("plan: already released"))
    }
}

fn stream_of(handle: usize) -> cust::sys::CUstream {
    handle as cust::sys::CUstream
}

#[pymethods]
impl PyDecoder {
    /// Load the kernels on device `device` (CUDA's ordinal). The caller's current context
    /// (torch's current device) is left as it was.
    #[new]
    fn new(device: u32) -> PyResult<Self> {
        let mut prev: cust::sys::CUcontext = std::ptr::null_mut();
        // SAFETY: reads the calling thread's current context (null when none) into a local.
        unsafe { cust::sys::cuCtxGetCurrent(&mut prev) };
        let made = etap::Decoder::on_device(device);
        // SAFETY: restores the context that was current before (on_device makes its own
        // current): `prev` is a live context (the caller, torch, holds it) or null (none: the
        // thread is left without a current context, as it was).
        unsafe { cust::sys::cuCtxSetCurrent(prev) };
        Ok(PyDecoder {
            inner: Arc::new(Owned::new(made.map_err(to_py)?).map_err(to_py)?),
        })
    }

    #[getter]
    fn device(&self) -> u32 {
        self.inner.device()
    }

    #[getter]
    fn num_sms(&self) -> u32 {
        self.inner.num_sms()
    }

    /// Make a plan for the shape (the cache's pages of `page_size` rows) from the device's
    /// `int32[batch]` seqlens at address
    /// `cache_seqlens`, enqueued on `stream` (no host synchronization). Allocates the plan's
    /// device buffers: not while the stream captures a graph. `total_q` given: a plan for the
    /// packed query layout of `total_q` tokens, at most `s_q` a request (decode it with
    /// `cu_seqlens_q`); None: the uniform layout, `s_q` tokens a request. `kv_format`: None for
    /// a 16-bit cache (decode it with `decode`), "fp8_656" or "fp8_per_tensor" for an FP8 one
    /// (decode it with `decode_fp8`; pages of 64 rows, either query layout; past 16 columns in
    /// CTAs of 32, past 32 heads on M); `kv_page_stride`: its rows between pages where not its
    /// format's (None).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (batch, s_q, h_q, num_pages, max_pages, page_size, cache_seqlens, stream, total_q=None, kv_format=None, kv_page_stride=None))]
    fn plan(
        &self,
        batch: usize,
        s_q: usize,
        h_q: usize,
        num_pages: usize,
        max_pages: usize,
        page_size: usize,
        cache_seqlens: u64,
        stream: usize,
        total_q: Option<usize>,
        kv_format: Option<&str>,
        kv_page_stride: Option<usize>,
    ) -> PyResult<PyPlan> {
        let shape = shape_of(
            batch,
            s_q,
            h_q,
            num_pages,
            max_pages,
            page_size,
            total_q,
            kv_format,
            kv_page_stride,
        )?;
        let _guard = ContextGuard::new(&self.inner).map_err(to_py)?;
        let stream = stream_of(stream);
        // SAFETY: the Python layer passes torch's current stream of the tensors' device, a
        // live handle; check_stream rejects one of another context.
        unsafe { check_stream(&self.inner, stream) }.map_err(to_py)?;
        // SAFETY: as above.
        if unsafe { capture_id(stream) }.map_err(to_py)?.is_some() {
            return Err(PyRuntimeError::new_err(
                "etap: a new plan allocates device memory, which is not allowed while the stream \
                 captures a CUDA graph: run the same call once before capturing (a warm-up), so \
                 the capture re-plans the existing plan in place",
            ));
        }
        // SAFETY: `cache_seqlens` is the address of the caller's live int32[batch] device tensor
        // on this device (checked by the Python layer), read in stream order by the scheduler.
        let plan = unsafe { self.inner.plan_raw(&shape, cache_seqlens, stream, None) }.map_err(to_py)?;
        Ok(PyPlan {
            plan: Some(plan),
            decoder: self.inner.clone(),
        })
    }

    /// Re-plan `plan` in place for the seqlens now at `cache_seqlens` (one kernel launch, no
    /// allocation: capturable in a CUDA graph, where each replay re-plans).
    fn replan(&self, plan: &mut PyPlan, cache_seqlens: u64, stream: usize) -> PyResult<()> {
        if !Arc::ptr_eq(&plan.decoder, &self.inner) {
            return Err(PyValueError::new_err(format!(
                "plan: made by another decoder than this one (device {})",
                self.inner.device()
            )));
        }
        let p = plan
            .plan
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("plan: already released"))?;
        let _guard = ContextGuard::new(&self.inner).map_err(to_py)?;
        let stream = stream_of(stream);
        // SAFETY: as in `plan`.
        unsafe { check_stream(&self.inner, stream) }.map_err(to_py)?;
        // SAFETY: as in `plan`; the plan's own buffers are rewritten in stream order.
        unsafe { self.inner.replan_raw(p, cache_seqlens, stream) }.map_err(to_py)
    }

    /// Launch the decode on `stream`: q `[b, s_q, h_q, 576]`, the paged cache
    /// `[num_pages, page_size, 1, 576]` (the plan's page size), block table
    /// `int32[b, max_pages]` of pages of `page_size` rows, seqlens `int32[b]` (those
    /// the plan was last made for), out `[b, s_q, h_q, 512]` of q's dtype and lse
    /// `float32[b, h_q, s_q]`, all contiguous device tensors given by address.
    ///
    /// With a plan for the packed query layout (made with `total_q`), `cu_seqlens_q` is the
    /// address of the `int32[b + 1]` token offsets (request `r`'s tokens are rows
    /// `cu_seqlens_q[r]..cu_seqlens_q[r + 1]`), q is `[total_q, h_q, 576]`, out
    /// `[total_q, h_q, 512]` and lse `float32[total_q, h_q]`; with a uniform plan it is 0.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (plan, dtype, q, k_cache, block_table, cache_seqlens, out, lse, softmax_scale, stream, cu_seqlens_q=0))]
    fn decode(
        &self,
        plan: &PyPlan,
        dtype: &str,
        q: u64,
        k_cache: u64,
        block_table: u64,
        cache_seqlens: u64,
        out: u64,
        lse: u64,
        softmax_scale: Option<f64>,
        stream: usize,
        cu_seqlens_q: u64,
    ) -> PyResult<()> {
        if !Arc::ptr_eq(&plan.decoder, &self.inner) {
            return Err(PyValueError::new_err(format!(
                "plan: made by another decoder than this one (device {})",
                self.inner.device()
            )));
        }
        let dtype = dtype_of(dtype)?;
        check_alignment([q, k_cache, block_table, cache_seqlens, out, lse]).map_err(to_py)?;
        let scale = softmax_scale_of(softmax_scale)?;
        let p = plan.get()?;
        if let Some(f) = kv_format_name(p.shape().kv_format) {
            return Err(PyValueError::new_err(format!(
                "plan: made for an FP8 cache (kv_format {f:?}): decode it with `decode_fp8`"
            )));
        }
        check_offsets_for(p.shape(), cu_seqlens_q)?;
        let bufs = RawBuffers {
            q,
            kv_cache: k_cache,
            block_table,
            cache_seqlens,
            out,
            lse,
            q_offsets: cu_seqlens_q,
        };
        let _guard = ContextGuard::new(&self.inner).map_err(to_py)?;
        let stream = stream_of(stream);
        // SAFETY: as in `plan`.
        unsafe { check_stream(&self.inner, stream) }.map_err(to_py)?;
        // SAFETY: the Python layer checked every tensor: on this device, contiguous, of the
        // dtype and the exact shape the plan's shape implies (cu_seqlens_q, where given,
        // int32[b + 1]), out/lse freshly allocated or the caller's own (not overlapping the
        // inputs), and keeps them alive until the call returns; torch's stream ordering keeps
        // their memory valid until the kernels ran. The offsets' values are device data: the
        // kernels clamp each request's rows into q, out and lse (etap::DecodeShape).
        unsafe { self.inner.decode_raw(p, dtype, bufs, scale, stream) }.map_err(to_py)
    }

    /// Launch the decode over an FP8 cache on `stream`, with a plan made for its `kv_format`:
    /// q `[b, s_q, h_q, 576]` of `dtype` ("bf16" or "f16"), the cache's bytes at `k_cache` (16-byte aligned): in the
    /// "fp8_656" format `num_pages` pages of 64 tokens of 656 bytes, page `p` at
    /// `p * 65 * 656` (FlashMLA's quantizer's layout: `num_pages * 65 * 656` bytes), in the
    /// "fp8_per_tensor" format `[num_pages, 64, 576]` e4m3 bytes, or with the plan's
    /// `kv_page_stride` pages that many token rows apart (`num_pages * kv_page_stride` rows);
    /// block table, seqlens, out
    /// (q's dtype) and lse as `decode`'s uniform layout. `kv_scale`: the per-tensor format's scale
    /// (finite and positive as a float32), None for the 656-byte format (its scales are in the
    /// cache). `cu_seqlens_q`: as `decode`'s, for a plan of the packed query layout (q, out and
    /// lse then as there). Errors (ValueError) name the argument; nothing is launched then.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (plan, dtype, q, k_cache, block_table, cache_seqlens, out, lse, kv_scale, softmax_scale, stream, cu_seqlens_q=0))]
    fn decode_fp8(
        &self,
        plan: &PyPlan,
        dtype: &str,
        q: u64,
        k_cache: u64,
        block_table: u64,
        cache_seqlens: u64,
        out: u64,
        lse: u64,
        kv_scale: Option<f64>,
        softmax_scale: Option<f64>,
        stream: usize,
        cu_seqlens_q: u64,
    ) -> PyResult<()> {
        if !Arc::ptr_eq(&plan.decoder, &self.inner) {
            return Err(PyValueError::new_err(format!(
                "plan: made by another decoder than this one (device {})",
                self.inner.device()
            )));
        }
        let dtype = dtype_of(dtype)?;
        check_alignment([q, k_cache, block_table, cache_seqlens, out, lse]).map_err(to_py)?;
        let scale = softmax_scale_of(softmax_scale)?;
        let p = plan.get()?;
        if p.shape().kv_format == KvFormat::Elem16 {
            return Err(PyValueError::new_err(
                "plan: made for a 16-bit cache (decode it with `decode`, or make a plan with kv_format)",
            ));
        }
        check_offsets_for(p.shape(), cu_seqlens_q)?;
        // The scale as the kernel takes it (f32): etap checks it is finite and positive there, so
        // a float64 that rounds to 0 or infinity is refused too.
        let kv_scale = kv_scale.map(|s| s as f32);
        let bufs = RawBuffers {
            q,
            kv_cache: k_cache,
            block_table,
            cache_seqlens,
            out,
            lse,
            q_offsets: cu_seqlens_q,
        };
        let _guard = ContextGuard::new(&self.inner).map_err(to_py)?;
        let stream = stream_of(stream);
        // SAFETY: as in `plan`.
        unsafe { check_stream(&self.inner, stream) }.map_err(to_py)?;
        // SAFETY: the Python layer checked every tensor: on this device, of the dtype and the
        // exact shape the plan's shape implies (q and out of `dtype` and contiguous; the cache's bytes
        // in the plan's format, `shape.cache_len()` of them from `k_cache` inside its
        // allocation: the 656-byte format's strided pages included; cu_seqlens_q, where given,
        // int32[b + 1]), out/lse not overlapping the inputs, and keeps them alive until the call
        // returns; torch's stream ordering keeps their memory valid until the kernels ran. The
        // offsets' values are device data, clamped by the kernels as in `decode`.
        unsafe { self.inner.decode_fp8_raw(p, dtype, bufs, kv_scale, scale, stream) }.map_err(to_py)
    }
}

#[pymethods]
impl PyPlan {
    /// (batch, s_q, h_q, num_pages, max_pages, page_size) the plan was made for; in the packed
    /// query layout s_q is the most tokens a request may have (see `total_q`).
    #[getter]
    fn shape(&self) -> PyResult<(usize, usize, usize, usize, usize, usize)> {
        let s = self.get()?.shape();
        Ok((s.batch, s.s_q, s.h_q, s.num_pages, s.max_pages, s.page_size))
    }

    /// The packed query layout's token count (rows of q, out and lse), None for a plan of the
    /// uniform layout.
    #[getter]
    fn total_q(&self) -> PyResult<Option<usize>> {
        Ok(self.get()?.shape().packed_q)
    }

    /// The cache format the plan was made for: None (16-bit), "fp8_656" or "fp8_per_tensor".
    #[getter]
    fn kv_format(&self) -> PyResult<Option<&'static str>> {
        Ok(kv_format_name(self.get()?.shape().kv_format))
    }

    /// The FP8 cache's rows between pages the plan was made for, where not its format's
    /// (None: 65 for "fp8_656", FlashMLA's quantizer's layout; 64 for "fp8_per_tensor").
    #[getter]
    fn kv_page_stride(&self) -> PyResult<Option<usize>> {
        Ok(self.get()?.shape().kv_page_stride)
    }

    #[getter]
    fn device(&self) -> u32 {
        self.decoder.device()
    }

    /// The kernel layout the plan picked ("KvOnM", "HeadsOnM" or "Seesaw").
    #[getter]
    fn layout(&self) -> PyResult<String> {
        Ok(format!("{:?}", self.get()?.tiling().layout))
    }

    /// CTAs per column group (FlashMLA's num_sm_parts).
    #[getter]
    fn parts(&self) -> PyResult<u32> {
        Ok(self.get()?.parts())
    }

    fn __repr__(&self) -> String {
        match &self.plan {
            Some(p) => {
                let s = p.shape();
                // The packed layout: its token count, and s_q as what it is there.
                let tokens = match s.packed_q {
                    Some(total_q) => format!("total_q={total_q}, max_seqlen_q={}", s.s_q),
                    None => format!("s_q={}", s.s_q),
                };
                let format = match (kv_format_name(s.kv_format), s.kv_page_stride) {
                    (Some(f), Some(rows)) => format!(", kv_format={f}, kv_page_stride={rows}"),
                    (Some(f), None) => format!(", kv_format={f}"),
                    (None, _) => String::new(),
                };
                format!(
                    "etap.Plan(device={}, batch={}, {tokens}, h_q={}, num_pages={}, max_pages={}, page_size={}{format}, \
                     layout={:?})",
                    self.decoder.device(),
                    s.batch,
                    s.h_q,
                    s.num_pages,
                    s.max_pages,
                    s.page_size,
                    p.tiling().layout
                )
            }
            None => "etap.Plan(released)".into(),
        }
    }
}

/// The id of the CUDA graph capture the stream (a raw handle) is in, or None.
#[pyfunction]
fn stream_capture_id(decoder: &PyDecoder, stream: usize) -> PyResult<Option<u64>> {
    let _guard = ContextGuard::new(&decoder.inner).map_err(to_py)?;
    // SAFETY: a stream handle from torch (the caller's contract, as in `Decoder.plan`).
    unsafe { capture_id(stream_of(stream)) }.map_err(to_py)
}

// --- the FP8 formats' CPU quantizers (etap::fp8), on bytes: for cross-checks and torch-free use ---

/// bf16 values from their little-endian bytes (signalling NaNs come back quiet).
fn bf16_from_bytes(arg: &'static str, bytes: &[u8], len: usize) -> PyResult<Vec<Bf16>> {
    if bytes.len() != 2 * len {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected {} bytes ({len} bf16), got {}",
            2 * len,
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|b| Bf16::from_f32(f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)))
        .collect())
}

/// bf16 values as little-endian bytes (exact: a bf16 is the top half of its f32).
fn bf16_to_bytes(values: &[Bf16]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| ((v.to_f32().to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

/// A per-tensor scale as the kernel takes it: an f32, finite and positive.
fn e4m3_scale_of(scale: f64) -> PyResult<f32> {
    let s = scale as f32;
    if s.is_finite() && s > 0.0 {
        Ok(s)
    } else {
        Err(PyValueError::new_err(format!(
            "kv_scale: {scale} must be finite and positive (as a float32)"
        )))
    }
}

/// etap's quantizer of FlashMLA's 656-byte format (`etap::fp8::quantize_fp8_656`): `cache`,
/// the little-endian bytes of a bf16 `[num_pages, 64, 576]` cache, to `num_pages * 65 * 656`
/// bytes (token `t` of page `p` at `(p * 65 + t) * 656`; each page's 65th slot zero).
#[pyfunction]
fn quantize_fp8_656<'py>(py: Python<'py>, cache: &[u8], num_pages: usize) -> PyResult<Bound<'py, PyBytes>> {
    let values = bf16_from_bytes("cache", cache, num_pages * etap_core::TILE_ROWS * etap_core::D_QK)?;
    Ok(PyBytes::new(py, &fp8::quantize_fp8_656(&values, num_pages)))
}

/// The bf16 cache (little-endian bytes, `[num_pages, 64, 576]`) that `num_pages * 65 * 656`
/// bytes of the 656-byte format stand for (`etap::fp8::dequantize_fp8_656`).
#[pyfunction]
fn dequantize_fp8_656<'py>(py: Python<'py>, data: &[u8], num_pages: usize) -> PyResult<Bound<'py, PyBytes>> {
    if data.len() != num_pages * fp8::FP8_656_PAGE_STRIDE {
        return Err(PyValueError::new_err(format!(
            "data: expected {} bytes ({num_pages} pages of {}), got {}",
            num_pages * fp8::FP8_656_PAGE_STRIDE,
            fp8::FP8_656_PAGE_STRIDE,
            data.len()
        )));
    }
    Ok(PyBytes::new(
        py,
        &bf16_to_bytes(&fp8::dequantize_fp8_656(data, num_pages)),
    ))
}

/// `etap::fp8::per_tensor_scale` of a bf16 cache (little-endian bytes): its largest magnitude
/// (NaN ignored) over 448, in float32; 1 for an all-zero cache.
#[pyfunction]
fn per_tensor_scale(cache: &[u8]) -> PyResult<f32> {
    Ok(fp8::per_tensor_scale(&bf16_from_bytes(
        "cache",
        cache,
        cache.len() / 2,
    )?))
}

/// `etap::fp8::quantize_e4m3_per_tensor`: each bf16 of `cache` (little-endian bytes) as the
/// e4m3 byte of `value / scale` (float32 division, round to nearest even, NaN past 464).
#[pyfunction]
fn quantize_e4m3_per_tensor<'py>(py: Python<'py>, cache: &[u8], scale: f64) -> PyResult<Bound<'py, PyBytes>> {
    let scale = e4m3_scale_of(scale)?;
    let values = bf16_from_bytes("cache", cache, cache.len() / 2)?;
    Ok(PyBytes::new(py, &fp8::quantize_e4m3_per_tensor(&values, scale)))
}

/// `etap::fp8::dequantize_e4m3_per_tensor`: e4m3 bytes times `scale` (float32), as the
/// little-endian bytes of bf16 values.
#[pyfunction]
fn dequantize_e4m3_per_tensor<'py>(py: Python<'py>, data: &[u8], scale: f64) -> PyResult<Bound<'py, PyBytes>> {
    let scale = e4m3_scale_of(scale)?;
    Ok(PyBytes::new(
        py,
        &bf16_to_bytes(&fp8::dequantize_e4m3_per_tensor(data, scale)),
    ))
}

/// `etap::fp8::e4m3_from_f32` of each float32 of `values` (little-endian bytes): one e4m3 byte
/// each.
#[pyfunction]
fn e4m3_from_f32<'py>(py: Python<'py>, values: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    if !values.len().is_multiple_of(4) {
        return Err(PyValueError::new_err(format!(
            "values: float32 bytes expected (a multiple of 4), got {}",
            values.len()
        )));
    }
    let out: Vec<u8> = values
        .chunks_exact(4)
        .map(|b| fp8::e4m3_from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    Ok(PyBytes::new(py, &out))
}

#[pymodule]
fn _etap(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDecoder>()?;
    m.add_class::<PyPlan>()?;
    m.add_function(wrap_pyfunction!(validate_shape, m)?)?;
    m.add_function(wrap_pyfunction!(check_addresses, m)?)?;
    m.add_function(wrap_pyfunction!(stream_capture_id, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_fp8_656, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_fp8_656, m)?)?;
    m.add_function(wrap_pyfunction!(per_tensor_scale, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_e4m3_per_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_e4m3_per_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(e4m3_from_f32, m)?)?;
    m.add("D_QK", etap_core::D_QK)?;
    m.add("D_V", etap_core::D_V)?;
    m.add("MAX_HEADS", etap_core::MAX_HEADS)?;
    m.add("MAX_S_Q", etap_core::MAX_S_Q)?;
    m.add("PAGE_SIZES", etap_core::PAGE_SIZES.to_vec())?;
    m.add("DEFAULT_PAGE_SIZE", etap::DEFAULT_PAGE_SIZE)?;
    m.add("FP8_656_TOKEN_BYTES", fp8::FP8_656_TOKEN_BYTES)?;
    m.add("FP8_656_PAGE_STRIDE", fp8::FP8_656_PAGE_STRIDE)?;
    m.add("FP8_TENSOR_TOKEN_BYTES", fp8::FP8_TENSOR_TOKEN_BYTES)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
