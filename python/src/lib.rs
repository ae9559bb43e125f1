//! `etap._etap`: the native half of the `etap` Python package. Deliberately thin: the Python
//! layer (python/etap/) reads the tensors' attributes, checks dtypes, devices, shapes and
//! strides, and passes plain integers here (device addresses, sizes, the stream handle), so the
//! wheel links neither libtorch nor libpython and works with any torch version.
use etap::interop::{capture_id, check_alignment, check_stream, ContextGuard};
use etap::{DecodeShape, Dtype, EtapError, RawBuffers};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
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

/// The decode shape, checked; `total_q` `Some`: the packed query layout (`s_q` is then the most
/// tokens a request may have, and `total_q` at most `batch * s_q`: more could not be split
/// into `batch` requests of at most `s_q` tokens).
fn shape_of(
    batch: usize,
    s_q: usize,
    h_q: usize,
    num_pages: usize,
    max_pages: usize,
    page_size: usize,
    total_q: Option<usize>,
) -> PyResult<DecodeShape> {
    let mut shape = DecodeShape::new(batch, s_q, h_q, num_pages, max_pages).with_page_size(page_size);
    if let Some(total_q) = total_q {
        shape = shape.with_packed_q(total_q);
    }
    // Checks `total_q <= batch * s_q` too.
    etap::validate::validate_shape(&shape).map_err(to_py)?;
    Ok(shape)
}

/// Check a decode shape without a GPU: raises ValueError naming the field at fault.
/// `page_size`: the cache's rows per page (one of `PAGE_SIZES`); `total_q`: the packed query
/// layout's token count (`s_q` is then the most tokens a request has), None for the uniform one.
#[pyfunction]
#[pyo3(signature = (batch, s_q, h_q, num_pages, max_pages, page_size, total_q=None))]
fn validate_shape(
    batch: usize,
    s_q: usize,
    h_q: usize,
    num_pages: usize,
    max_pages: usize,
    page_size: usize,
    total_q: Option<usize>,
) -> PyResult<()> {
    shape_of(batch, s_q, h_q, num_pages, max_pages, page_size, total_q).map(|_| ())
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
    /// `cu_seqlens_q`); None: the uniform layout, `s_q` tokens a request.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (batch, s_q, h_q, num_pages, max_pages, page_size, cache_seqlens, stream, total_q=None))]
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
    ) -> PyResult<PyPlan> {
        let shape = shape_of(batch, s_q, h_q, num_pages, max_pages, page_size, total_q)?;
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
        let scale = match softmax_scale {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && (s as f32).is_finite() && (s as f32) > 0.0 => Some(s as f32),
            Some(s) => {
                return Err(PyValueError::new_err(format!(
                    "softmax_scale: {s} must be finite and positive"
                )))
            }
        };
        let p = plan.get()?;
        match (p.shape().packed_q, cu_seqlens_q) {
            (Some(total_q), 0) => {
                return Err(PyValueError::new_err(format!(
                    "cu_seqlens_q: needed: the plan is for the packed query layout (total_q = {total_q})"
                )))
            }
            (None, a) if a != 0 => {
                return Err(PyValueError::new_err(
                    "cu_seqlens_q: given, but the plan is for the uniform query layout (make one with total_q)",
                ))
            }
            _ => check_offsets_alignment(cu_seqlens_q)?,
        }
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
                format!(
                    "etap.Plan(device={}, batch={}, {tokens}, h_q={}, num_pages={}, max_pages={}, page_size={}, \
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

#[pymodule]
fn _etap(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDecoder>()?;
    m.add_class::<PyPlan>()?;
    m.add_function(wrap_pyfunction!(validate_shape, m)?)?;
    m.add_function(wrap_pyfunction!(check_addresses, m)?)?;
    m.add_function(wrap_pyfunction!(stream_capture_id, m)?)?;
    m.add("D_QK", etap_core::D_QK)?;
    m.add("D_V", etap_core::D_V)?;
    m.add("MAX_HEADS", etap_core::MAX_HEADS)?;
    m.add("MAX_S_Q", etap_core::MAX_S_Q)?;
    m.add("PAGE_SIZES", etap_core::PAGE_SIZES.to_vec())?;
    m.add("DEFAULT_PAGE_SIZE", etap::DEFAULT_PAGE_SIZE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
