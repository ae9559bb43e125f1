//! Raw CUDA driver calls beyond what `cust` wraps: stream capture state, a stream's context,
//! asynchronous copies and fills, page-locked host memory. Each returns a checked [`Result`];
//! nothing above this module calls `cust::sys` for these.
use crate::error::{EtapError, Result};
use cust::sys::{self as cu, CUcontext, CUfunction, CUresult, CUstream};
use std::ffi::c_void;

fn check(rc: CUresult, what: &str) -> Result<()> {
    if rc == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(EtapError::Device(format!("{what} failed: {rc:?}")))
    }
}

/// Whether `stream` is capturing into a CUDA graph now (work enqueued on it is recorded, not
/// run).
///
/// # Safety
/// `stream` is a live stream handle (or null, the legacy default stream).
pub unsafe fn is_capturing(stream: CUstream) -> Result<bool> {
    let mut status = cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    check(cu::cuStreamIsCapturing(stream, &mut status), "cuStreamIsCapturing")?;
    Ok(status == cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
}

/// The context `stream` belongs to (for the legacy default stream, the current context).
///
/// # Safety
/// As [`is_capturing`].
pub unsafe fn stream_context(stream: CUstream) -> Result<CUcontext> {
    let mut ctx: CUcontext = std::ptr::null_mut();
    check(cu::cuStreamGetCtx(stream, &mut ctx), "cuStreamGetCtx")?;
    Ok(ctx)
}

/// The calling thread's current context (null when none).
pub fn current_context() -> Result<CUcontext> {
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: writes one handle through a valid pointer.
    check(unsafe { cu::cuCtxGetCurrent(&mut ctx) }, "cuCtxGetCurrent")?;
    Ok(ctx)
}

/// The device of the calling thread's current context, `None` when no context is current.
pub fn current_device() -> Result<Option<u32>> {
    if current_context()?.is_null() {
        return Ok(None);
    }
    let mut device: cu::CUdevice = 0;
    // SAFETY: a context is current (checked above); writes one int through a valid pointer.
    check(unsafe { cu::cuCtxGetDevice(&mut device) }, "cuCtxGetDevice")?;
    Ok(Some(device as u32))
}

/// Push `ctx` on the calling thread's context stack (it becomes current).
///
/// # Safety
/// `ctx` is a live context; the caller pops it ([`pop_context`]) on the same thread.
pub unsafe fn push_context(ctx: CUcontext) -> Result<()> {
    check(
        cu::cuCtxPushCurrent_v2(ctx),
        "making the device's context current (cuCtxPushCurrent)",
    )
}

/// Pop the calling thread's current context (the one a [`push_context`] made current).
///
/// # Safety
/// After a [`push_context`] on this thread that nothing popped yet.
pub unsafe fn pop_context() {
    let mut popped: CUcontext = std::ptr::null_mut();
    cu::cuCtxPopCurrent_v2(&mut popped);
}

/// The id of the CUDA graph capture `stream` is in now, or `None` when it is not capturing. Ids
/// are unique per process, so a caller can tell one capture from the next.
///
/// # Safety
/// As [`is_capturing`].
pub unsafe fn capture_id(stream: CUstream) -> Result<Option<u64>> {
    let mut status = cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let mut id: u64 = 0;
    check(
        cu::cuStreamGetCaptureInfo(stream, &mut status, &mut id),
        "cuStreamGetCaptureInfo",
    )?;
    Ok(match status {
        cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => None,
        _ => Some(id),
    })
}

/// Copy `bytes` bytes from host `src` to device `dst` in stream order.
///
/// # Safety
/// `dst` is device memory of at least `bytes` bytes that nothing else writes meanwhile; `src`
/// holds `bytes` readable bytes until the driver has read them: for pageable memory, until
/// this call returns (the driver stages it); for page-locked memory, until the copy has run
/// (in a captured graph, at every replay).
pub unsafe fn copy_htod_async(dst: u64, src: *const c_void, bytes: usize, stream: CUstream) -> Result<()> {
    check(cu::cuMemcpyHtoDAsync_v2(dst, src, bytes, stream), "cuMemcpyHtoDAsync")
}

/// Fill `count` 32-bit words at device address `dst` with `value`, in stream order.
///
/// # Safety
/// `dst` is 4-byte aligned device memory of at least `count` words.
pub unsafe fn fill_u32_async(dst: u64, value: u32, count: usize, stream: CUstream) -> Result<()> {
    check(cu::cuMemsetD32Async(dst, value, count, stream), "cuMemsetD32Async")
}

/// Page-locked host memory of `len` values of `T` (zeroed), freed on drop: the source of copies
/// recorded in CUDA graphs, which read it at every replay.
pub struct PinnedBuffer<T: Copy> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the buffer is plain host memory owned by this value; the driver reads it only through
// copies its owner enqueues, which the owner orders with its own writes.
unsafe impl<T: Copy + Send> Send for PinnedBuffer<T> {}
// SAFETY: shared references only read it (`as_ptr`); writes need `&mut self`.
unsafe impl<T: Copy + Sync> Sync for PinnedBuffer<T> {}

impl<T: Copy> PinnedBuffer<T> {
    pub fn zeroed(len: usize) -> Result<Self> {
        let bytes = len * std::mem::size_of::<T>();
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: allocates `bytes` bytes of page-locked memory into `p` (in the current context).
        check(unsafe { cu::cuMemAllocHost_v2(&mut p, bytes.max(1)) }, "cuMemAllocHost")?;
        // SAFETY: `p` points to `bytes` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) };
        Ok(PinnedBuffer { ptr: p as *mut T, len })
    }

    /// Write `v` at index `i`.
    pub fn set(&mut self, i: usize, v: T) {
        assert!(i < self.len, "PinnedBuffer index {i} out of {}", self.len);
        // SAFETY: in bounds (checked), and `&mut self` excludes other host access.
        unsafe { self.ptr.add(i).write(v) }
    }

    /// The address of element `i` (for a copy's source).
    pub fn as_ptr(&self, i: usize) -> *const T {
        assert!(i < self.len, "PinnedBuffer index {i} out of {}", self.len);
        // SAFETY: in bounds (checked).
        unsafe { self.ptr.add(i) }
    }
}

impl<T: Copy> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemAllocHost and is freed once. Copies recorded in graphs
        // that read it must not replay after its owner is dropped (the owner's docs say so).
        unsafe {
            cu::cuMemFreeHost(self.ptr as *mut c_void);
        }
    }
}

/// Raise a kernel's dynamic shared-memory limit (above the default 48 KiB) to `bytes`.
pub fn set_dynamic_smem(func: &cust::function::Function, bytes: u32) -> Result<()> {
    use cust::sys::{cuFuncSetAttribute, CUfunction_attribute};
    // SAFETY: `func` is a live function handle of a loaded module; the attribute takes an int.
    let rc = unsafe {
        cuFuncSetAttribute(
            func.to_raw(),
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
    };
    if rc != CUresult::CUDA_SUCCESS {
        return Err(EtapError::Device(format!(
            "cuFuncSetAttribute(max dynamic smem = {bytes}) failed: {rc:?}"
        )));
    }
    Ok(())
}

/// `CUlaunchAttribute` of the CUDA 12 driver API (not in `cust_raw` 0.11): an id and a
/// 64-byte value union, 8-byte aligned.
#[repr(C)]
struct LaunchAttribute {
    id: u32,
    _pad: u32,
    value: [u64; 8],
}

/// `CUlaunchConfig` of the CUDA 12 driver API.
#[repr(C)]
struct LaunchConfig {
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
    stream: cust::sys::CUstream,
    attrs: *mut LaunchAttribute,
    num_attrs: u32,
}

/// `CU_LAUNCH_ATTRIBUTE_COOPERATIVE`.
const LAUNCH_ATTRIBUTE_COOPERATIVE: u32 = 2;
/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`.
const LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: u32 = 6;

extern "C" {
    fn cuLaunchKernelEx(
        config: *const LaunchConfig,
        f: CUfunction,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> cust::sys::CUresult;
}

/// Launch a kernel by raw handle.
///
/// # Safety
/// `f` is a kernel of a live module of the current context; `params` holds one pointer per
/// kernel parameter, each to a value of exactly the parameter's type and size, live for the
/// call (the driver copies them before returning); `smem` is within the kernel's limit.
pub(crate) unsafe fn launch(
    f: CUfunction,
    grid: (u32, u32),
    block: u32,
    smem: u32,
    stream: CUstream,
    params: &mut [*mut c_void],
) -> Result<()> {
    launch_ex(f, grid, block, smem, stream, params, false)
}

/// Launch a kernel by raw handle cooperatively: the driver starts it only when every CTA of the
/// grid can be resident at once (or fails the launch), so its CTAs may wait for each other.
///
/// # Safety
/// As [`launch`].
pub(crate) unsafe fn launch_cooperative(
    f: CUfunction,
    grid: (u32, u32),
    block: u32,
    smem: u32,
    stream: CUstream,
    params: &mut [*mut c_void],
) -> Result<()> {
    launch_ex(f, grid, block, smem, stream, params, true)
}

/// Both launches: `cuLaunchKernelEx`; when `cooperative` (the decode kernels) with the
/// cooperative attribute and programmatic stream serialization (the kernel may start before
/// the stream's previous kernel ends; the decode kernels wait for it with
/// `griddepcontrol.wait` before they read memory).
///
/// # Safety
/// As [`launch`].
unsafe fn launch_ex(
    f: CUfunction,
    grid: (u32, u32),
    block: u32,
    smem: u32,
    stream: CUstream,
    params: &mut [*mut c_void],
    cooperative: bool,
) -> Result<()> {
    // Each attribute's value is an int at the start of the union: 1.
    let attr = |id| {
        let mut a = LaunchAttribute {
            id,
            _pad: 0,
            value: [0; 8],
        };
        a.value[0] = 1;
        a
    };
    let mut attrs = [
        attr(LAUNCH_ATTRIBUTE_COOPERATIVE),
        attr(LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION),
    ];
    let config = LaunchConfig {
        grid: [grid.0, grid.1, 1],
        block: [block, 1, 1],
        smem,
        stream,
        attrs: attrs.as_mut_ptr(),
        num_attrs: if cooperative { attrs.len() as u32 } else { 0 },
    };
    let rc = cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut());
    if rc != cust::sys::CUresult::CUDA_SUCCESS {
        return Err(EtapError::Device(format!(
            "kernel launch{} failed: {rc:?}",
            if cooperative { " (cooperative)" } else { "" }
        )));
    }
    Ok(())
}

/// A CUDA graph captured from a stream and instantiated, for replays (serving engines run each
/// decode step as one). Destroyed on drop.
pub struct Graph {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
}

impl Graph {
    /// Record the work `body` enqueues on `stream` (global capture mode: calls that would
    /// synchronize are errors meanwhile) and instantiate it. Nothing runs until [`Graph::launch`].
    ///
    /// # Safety
    /// `stream` is a live, non-default stream of the current context; every buffer the recorded
    /// work uses must stay valid for every launch of the graph.
    pub unsafe fn capture(stream: CUstream, body: impl FnOnce() -> Result<()>) -> Result<Graph> {
        check(
            cu::cuStreamBeginCapture_v2(stream, cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL),
            "cuStreamBeginCapture",
        )?;
        let recorded = body();
        let mut graph: cu::CUgraph = std::ptr::null_mut();
        let ended = check(cu::cuStreamEndCapture(stream, &mut graph), "cuStreamEndCapture");
        recorded?;
        ended?;
        let mut exec: cu::CUgraphExec = std::ptr::null_mut();
        if let Err(e) = check(
            cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0),
            "cuGraphInstantiate",
        ) {
            cu::cuGraphDestroy(graph);
            return Err(e);
        }
        Ok(Graph { graph, exec })
    }

    /// Replay the graph on `stream`.
    ///
    /// # Safety
    /// As [`Graph::capture`]: the buffers it recorded are still valid.
    pub unsafe fn launch(&self, stream: CUstream) -> Result<()> {
        check(cu::cuGraphLaunch(self.exec, stream), "cuGraphLaunch")
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `capture` and are destroyed once.
        unsafe {
            cu::cuGraphExecDestroy(self.exec);
            cu::cuGraphDestroy(self.graph);
        }
    }
}

/// A stream that does not synchronize with the legacy default stream (`cust`'s `Stream::new`
/// drops that flag), as CUDA-graph capture and serving engines use. Destroyed on drop.
pub struct RawStream(CUstream);

impl RawStream {
    pub fn non_blocking() -> Result<RawStream> {
        let mut s: CUstream = std::ptr::null_mut();
        // SAFETY: creates a stream in the current context into `s`.
        check(
            unsafe { cu::cuStreamCreate(&mut s, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
            "cuStreamCreate",
        )?;
        Ok(RawStream(s))
    }

    /// The handle, for the raw entry points (`Decoder::decode_raw`, ...).
    pub fn raw(&self) -> CUstream {
        self.0
    }

    /// Wait until the stream's work has run; an error of that work is returned here.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream handle owned by self.
        check(unsafe { cu::cuStreamSynchronize(self.0) }, "cuStreamSynchronize")
    }
}

impl Drop for RawStream {
    fn drop(&mut self) {
        // SAFETY: created by `non_blocking`, destroyed once.
        unsafe {
            cu::cuStreamDestroy_v2(self.0);
        }
    }
}

/// A CUDA event for timing work on a [`RawStream`]. Destroyed on drop.
pub struct RawEvent(cu::CUevent);

impl RawEvent {
    pub fn new() -> Result<RawEvent> {
        let mut e: cu::CUevent = std::ptr::null_mut();
        // SAFETY: creates an event in the current context into `e`.
        check(unsafe { cu::cuEventCreate(&mut e, 0) }, "cuEventCreate")?;
        Ok(RawEvent(e))
    }

    /// Record the event on `stream`.
    pub fn record(&self, stream: &RawStream) -> Result<()> {
        // SAFETY: both handles are live (owned by their wrappers).
        check(unsafe { cu::cuEventRecord(self.0, stream.raw()) }, "cuEventRecord")
    }

    /// Microseconds from `start` to this event (both recorded and done).
    pub fn since_us(&self, start: &RawEvent) -> Result<f64> {
        let mut ms = 0f32;
        // SAFETY: both events are live; writes one float.
        check(
            unsafe { cu::cuEventElapsedTime(&mut ms, start.0, self.0) },
            "cuEventElapsedTime",
        )?;
        Ok(ms as f64 * 1e3)
    }
}

impl Drop for RawEvent {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        unsafe {
            cu::cuEventDestroy_v2(self.0);
        }
    }
}
