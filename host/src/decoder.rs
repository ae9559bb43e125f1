//! The decoder: the device's context and the loaded kernels, and the whole public API on them:
//! plan and re-plan (the split schedule, on the GPU), decode (the launch), the checked path for
//! the tables, and the raw entry points for interop. The plan's state is in `plan`, the raw
//! driver calls in `driver`.
use crate::driver::{self, launch, launch_cooperative};
use crate::dtype::{Dtype, Element};
use crate::error::{EtapError, Result};
use crate::plan::{ColumnTiling, Layout, Plan, RawBuffers};
use crate::shape::{DecodeShape, KvFormat};
use crate::tma::TensorMap;
use crate::validate::{validate_lengths, validate_shape, validate_tables};
use cust::context::Context;
use cust::device::Device;
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::module::Module;
use cust::stream::Stream;
use cust::sys::CUfunction;
use cust::sys::CUstream;
use etap_core::contract::{DecodeParams, Kernel};
use etap_core::D_QK;
use std::ffi::c_void;

/// Raw handles of the kernels (`Kernel::ALL`'s order), looked up once when the module loads
/// (a lookup by name and a shared-memory attribute per call would cost microseconds of host time
/// per decode step). Valid while the module lives: [`Decoder`] owns both.
pub(crate) struct Kernels([CUfunction; Kernel::ALL.len()]);

impl Kernels {
    pub(crate) fn get(&self, k: Kernel) -> CUfunction {
        let i = Kernel::ALL
            .iter()
            .position(|&x| x == k)
            .expect("every kernel is in Kernel::ALL");
        self.0[i]
    }
}

/// Owns a reference to a device's primary context and the kernel module loaded into it.
///
/// The context is the device's *primary* context (the one the CUDA runtime, and so PyTorch,
/// uses), retained, not created: memory allocated by other libraries on the device is valid
/// in it, and their streams can be used with it.
pub struct Decoder {
    kernels: Kernels,
    module: Module,
    num_sms: u32,
    device: u32,
    ctx: Context,
}

// SAFETY: a Decoder holds driver handles (the retained primary context, the module and its
// functions) that it never mutates after construction; the CUDA driver API is thread-safe, and
// a primary context may be made current on any number of threads at once. What is per-thread is
// which context is *current*: every method that allocates or launches needs the decoder's
// context current on the calling thread (`Decoder::new` / `on_device` make it current on the
// constructing thread; elsewhere use `cuCtxSetCurrent` / `cuCtxPushCurrent` with
// `Decoder::context_raw`, as `etap::interop::ContextGuard` does). Calling with another context
// current makes the driver calls fail with an error; it does not touch the wrong memory, since
// each launch names functions of this decoder's module, which the driver rejects in another
// context.
unsafe impl Send for Decoder {}
// SAFETY: see `Send`: every method takes `&self` and only reads the handles.
unsafe impl Sync for Decoder {}

impl Decoder {
    /// Initialize CUDA on device 0, check that it is Hopper (compute capability 9.x), and load
    /// the embedded PTX (or the PTX file named by the `ETAP_PTX` environment variable). The
    /// device's primary context is left current on the calling thread.
    pub fn new() -> Result<Self> {
        Self::on_device(0)
    }

    /// As [`Decoder::new`], on the device of the calling thread's current context (PyTorch's
    /// current device, say: torch makes its device's primary context current). The decoder
    /// uses that device's primary context; without a current context this is device 0.
    pub fn current() -> Result<Self> {
        match cust::init(cust::CudaFlags::empty()) {
            Ok(()) => {}
            Err(cust::error::CudaError::NoDevice) => return Err(EtapError::NoDevice),
            Err(e) => return Err(e.into()),
        }
        match driver::current_device()? {
            Some(device) => Self::on_device(device),
            None => Self::on_device(0),
        }
    }

    /// As [`Decoder::new`], on the device of ordinal `index` (CUDA's numbering, as
    /// `torch.device("cuda", index)`; `CUDA_VISIBLE_DEVICES` applies).
    pub fn on_device(index: u32) -> Result<Self> {
        match cust::init(cust::CudaFlags::empty()) {
            Ok(()) => {}
            Err(cust::error::CudaError::NoDevice) => return Err(EtapError::NoDevice),
            Err(e) => return Err(e.into()),
        }
        let count = Device::num_devices()?;
        if count == 0 {
            return Err(EtapError::NoDevice);
        }
        if index >= count {
            return Err(EtapError::Device(format!(
                "device index {index} is out of range: this process sees {count} CUDA device(s)"
            )));
        }
        let device = Device::get_device(index)?;
        let major = device.get_attribute(cust::device::DeviceAttribute::ComputeCapabilityMajor)?;
        let minor = device.get_attribute(cust::device::DeviceAttribute::ComputeCapabilityMinor)?;
        if major != 9 {
            return Err(EtapError::Device(format!(
                "{} has compute capability {major}.{minor}; etap's kernels are built for sm_90a (Hopper)",
                device.name().unwrap_or_default()
            )));
        }
        let num_sms = device.get_attribute(cust::device::DeviceAttribute::MultiprocessorCount)? as u32;
        let ctx = Context::new(device)?;
        // The decode kernel trades registers between warpgroups with setmaxnreg, which needs a
        // register cap at entry: the module is compiled with the cap the PTX checks assume.
        // `ETAP_PTX` names a PTX file to load instead of the embedded one: for kernel
        // experiments on a GPU machine that has no Rust (several PTX builds, one binary).
        let ptx = match std::env::var_os("ETAP_PTX") {
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| EtapError::Device(format!("ETAP_PTX={}: {e}", path.to_string_lossy())))?,
            None => crate::PTX.to_string(),
        };
        let module = Module::from_ptx(
            &ptx,
            &[cust::module::ModuleJitOption::MaxRegisters(
                etap_core::DECODE_ENTRY_REGS,
            )],
        )?;
        let mut kernels = Kernels([std::ptr::null_mut(); Kernel::ALL.len()]);
        for (i, k) in Kernel::ALL.into_iter().enumerate() {
            let f = module.get_function(k.name())?;
            if k.smem_bytes() > 0 {
                crate::driver::set_dynamic_smem(&f, k.smem_bytes())?;
            }
            kernels.0[i] = f.to_raw();
        }
        Ok(Decoder {
            kernels,
            module,
            num_sms,
            device: index,
            ctx,
        })
    }

    /// The device ordinal this decoder runs on.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The raw handle of the device's primary context (to make it current on another thread).
    pub fn context_raw(&self) -> cust::sys::CUcontext {
        self.ctx.as_raw()
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Streaming multiprocessors of the device.
    pub fn num_sms(&self) -> u32 {
        self.num_sms
    }

    /// The loaded module (for tests that launch the test kernels).
    pub fn module(&self) -> &Module {
        &self.module
    }
}

impl Decoder {
    /// Make a split plan for `shape` from the device-resident `cache_seqlens`, on `stream`
    /// (nothing is copied back to the host). Re-plan it for each step's seqlens with
    /// [`Decoder::replan`].
    pub fn plan(&self, shape: &DecodeShape, cache_seqlens: &DeviceBuffer<i32>, stream: &Stream) -> Result<Plan> {
        self.plan_with_layout(shape, cache_seqlens, stream, Layout::for_shape(shape))
    }

    /// [`Decoder::plan`] with the layout chosen by the caller instead of by
    /// [`Layout::for_shape`] (for benchmarks and tests: both layouts handle every shape over a
    /// 16-bit cache and over an FP8 one: [`Layout::HeadsOnM`] there runs the wide FP8 kernel,
    /// which `plan` picks past 32 columns, and [`Layout::KvOnM`] the FP8 ETAP kernel, in column
    /// groups of 32 past 32).
    pub fn plan_with_layout(
        &self,
        shape: &DecodeShape,
        cache_seqlens: &DeviceBuffer<i32>,
        stream: &Stream,
        layout: Layout,
    ) -> Result<Plan> {
        validate_shape(shape)?;
        check_seqlens_len(shape, cache_seqlens.len())?;
        // SAFETY: a live device buffer of `shape.batch` i32 (checked), kept by the caller while
        // the stream runs the scheduling kernel (the borrow ends here, but `Stream` work on it
        // is ordered before the caller can free it only if the caller synchronizes or keeps
        // it: as for every cust buffer used with async work).
        unsafe {
            self.plan_raw(
                shape,
                cache_seqlens.as_device_ptr().as_raw(),
                stream.as_inner(),
                Some(layout),
            )
        }
    }

    /// The raw planning entry point (for interop: seqlens and stream from another library).
    /// `layout` `None` takes [`Layout::for_shape`]. Allocates the plan's buffers (not in a
    /// captured region), zeroes the merge counters and runs the scheduler on `stream`.
    ///
    /// # Safety
    /// `cache_seqlens` is the device address of `shape.batch` i32 in the current context, valid
    /// until `stream` has run the scheduler; `stream` is a stream of the current context (or
    /// null, the legacy default stream).
    pub unsafe fn plan_raw(
        &self,
        shape: &DecodeShape,
        cache_seqlens: u64,
        stream: CUstream,
        layout: Option<Layout>,
    ) -> Result<Plan> {
        validate_shape(shape)?;
        if !cache_seqlens.is_multiple_of(4) {
            return Err(EtapError::Misaligned {
                arg: "cache_seqlens",
                align: 4,
                addr: cache_seqlens,
            });
        }
        let layout = layout.unwrap_or_else(|| Layout::for_shape(shape));
        let tiling = ColumnTiling::for_shape(shape, layout);
        // A tiling no kernel runs over this cache (the FP8 kernels' tiling is the same for
        // either q dtype).
        tiling.kernel_for(Dtype::Bf16, shape.kv_format)?;
        // groups * parts <= num_sms CTAs (while groups <= num_sms: at most 1024 / 16 = 64 groups,
        // an FP8 cache's), each alone on its SM, so the cooperative launch has them all resident.
        let parts = (self.num_sms() / tiling.groups).max(1);
        let plan = Plan::allocate(shape, tiling, parts, stream)?;
        self.schedule(&plan, cache_seqlens, stream)?;
        Ok(plan)
    }

    /// Re-plan `plan` for new seqlens of the same shape (the next decode step), into its own
    /// buffers: one kernel launch on `stream`, no allocation and no host synchronization, so it
    /// may be captured in a CUDA graph beside the decode calls it plans.
    pub fn replan(&self, plan: &mut Plan, cache_seqlens: &DeviceBuffer<i32>, stream: &Stream) -> Result<()> {
        check_seqlens_len(&plan.shape, cache_seqlens.len())?;
        // SAFETY: a live device buffer of `batch` i32 (checked), borrowed for the call.
        unsafe { self.replan_raw(plan, cache_seqlens.as_device_ptr().as_raw(), stream.as_inner()) }
    }

    /// [`Decoder::replan`] with a raw seqlens address and stream.
    ///
    /// # Safety
    /// As [`Decoder::plan_raw`].
    pub unsafe fn replan_raw(&self, plan: &mut Plan, cache_seqlens: u64, stream: CUstream) -> Result<()> {
        if !cache_seqlens.is_multiple_of(4) {
            return Err(EtapError::Misaligned {
                arg: "cache_seqlens",
                align: 4,
                addr: cache_seqlens,
            });
        }
        check_context(plan, stream)?;
        self.schedule(plan, cache_seqlens, stream)
    }

    /// Launch the scheduler for `plan` on the seqlens at `cache_seqlens`.
    ///
    /// # Safety
    /// As [`Decoder::plan_raw`].
    unsafe fn schedule(&self, plan: &Plan, cache_seqlens: u64, stream: CUstream) -> Result<()> {
        let mut batch = plan.shape.batch as u32;
        let mut max_tiles = plan.shape.max_tiles() as u32;
        let mut parts_arg = plan.parts;
        let mut seq = cache_seqlens;
        let mut rp = plan.ranges.as_device_ptr().as_raw();
        let mut op = plan.split_offsets.as_device_ptr().as_raw();
        // SAFETY: the arguments match etap_schedule's signature (pointer, u32, u32, pointer,
        // u32, pointer); the buffers have the lengths it writes (`parts` ranges, `batch + 1`
        // offsets) and are owned by the plan, which the caller keeps while the stream runs.
        launch(
            self.kernels().get(Kernel::Schedule),
            (1, 1),
            1,
            0,
            stream,
            &mut [
                &mut seq as *mut u64 as *mut c_void,
                &mut batch as *mut u32 as *mut c_void,
                &mut max_tiles as *mut u32 as *mut c_void,
                &mut rp as *mut u64 as *mut c_void,
                &mut parts_arg as *mut u32 as *mut c_void,
                &mut op as *mut u64 as *mut c_void,
            ],
        )
    }

    /// The checked path: copy the block table and seqlens to the host (one synchronization,
    /// `4 * (b * max_pages + b)` bytes) and validate every used block-table entry and every
    /// seqlen. The unchecked path never reads out of bounds either (the copy engine fills
    /// rows outside the cache with zeros, and lengths are clamped to the block table), but a
    /// bad entry then silently yields wrong numbers.
    pub fn check_tables(
        &self,
        shape: &DecodeShape,
        block_table: &DeviceBuffer<i32>,
        cache_seqlens: &DeviceBuffer<i32>,
    ) -> Result<()> {
        validate_shape(shape)?;
        if block_table.len() != shape.block_table_len() {
            return Err(EtapError::Length {
                arg: "block_table",
                expected: shape.block_table_len(),
                got: block_table.len(),
            });
        }
        if cache_seqlens.len() != shape.batch {
            return Err(EtapError::Length {
                arg: "cache_seqlens",
                expected: shape.batch,
                got: cache_seqlens.len(),
            });
        }
        let mut bt = vec![0i32; block_table.len()];
        let mut sl = vec![0i32; cache_seqlens.len()];
        block_table.copy_to(&mut bt[..])?;
        cache_seqlens.copy_to(&mut sl[..])?;
        validate_tables(shape, &bt, &sl)
    }

    /// Decode one step: out `[b, s_q, h_q, 512]` and lse `[b, h_q, s_q]` (natural log) for q
    /// `[b, s_q, h_q, 576]` against the paged cache, with `plan` made for these seqlens.
    /// `softmax_scale` defaults to 1/sqrt(576). Returns new buffers; see [`Decoder::decode_into`].
    #[allow(clippy::too_many_arguments)]
    pub fn decode<T: Element>(
        &self,
        plan: &Plan,
        q: &DeviceBuffer<T>,
        kv_cache: &DeviceBuffer<T>,
        block_table: &DeviceBuffer<i32>,
        cache_seqlens: &DeviceBuffer<i32>,
        softmax_scale: Option<f32>,
        stream: &Stream,
    ) -> Result<(DeviceBuffer<T>, DeviceBuffer<f32>)> {
        let shape = plan.shape;
        validate_lengths(
            &shape,
            q.len(),
            kv_cache.len(),
            block_table.len(),
            cache_seqlens.len(),
            shape.out_len(),
            shape.lse_len(),
        )?;
        // SAFETY: both are fully written by the kernels before the caller can read them
        // (every (request, column) gets its out row and lse from the decode kernel).
        let mut out = unsafe { DeviceBuffer::<T>::uninitialized(shape.out_len())? };
        let mut lse = unsafe { DeviceBuffer::<f32>::uninitialized(shape.lse_len())? };
        self.decode_into(
            plan,
            q,
            kv_cache,
            block_table,
            cache_seqlens,
            softmax_scale,
            &mut out,
            &mut lse,
            stream,
        )?;
        Ok((out, lse))
    }

    /// As [`Decoder::decode`], writing into caller-owned `out` and `lse`. Every argument is
    /// validated first; on error nothing is launched and nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_into<T: Element>(
        &self,
        plan: &Plan,
        q: &DeviceBuffer<T>,
        kv_cache: &DeviceBuffer<T>,
        block_table: &DeviceBuffer<i32>,
        cache_seqlens: &DeviceBuffer<i32>,
        softmax_scale: Option<f32>,
        out: &mut DeviceBuffer<T>,
        lse: &mut DeviceBuffer<f32>,
        stream: &Stream,
    ) -> Result<()> {
        self.decode_into_layout(
            plan,
            q,
            None,
            kv_cache,
            block_table,
            cache_seqlens,
            softmax_scale,
            out,
            lse,
            stream,
        )
    }

    /// [`Decoder::decode_into`] for the packed query layout (a plan made for a shape
    /// `with_packed_q`): request `r`'s tokens are rows `q_offsets[r]..q_offsets[r + 1]` of q
    /// `[total_q, h_q, 576]`, out `[total_q, h_q, 512]` and lse `[total_q, h_q]`, at most `s_q`
    /// of them, and token `i` of `n` sees the cache rows `..seqlen - n + i + 1` (causal). The
    /// offsets are device data: [`Decoder::check_q_offsets`] validates them (one
    /// synchronization); unchecked, each request's rows are clamped into q, out and lse.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_packed_into<T: Element>(
        &self,
        plan: &Plan,
        q: &DeviceBuffer<T>,
        q_offsets: &DeviceBuffer<i32>,
        kv_cache: &DeviceBuffer<T>,
        block_table: &DeviceBuffer<i32>,
        cache_seqlens: &DeviceBuffer<i32>,
        softmax_scale: Option<f32>,
        out: &mut DeviceBuffer<T>,
        lse: &mut DeviceBuffer<f32>,
        stream: &Stream,
    ) -> Result<()> {
        check_offsets_len(&plan.shape, q_offsets.len())?;
        self.decode_into_layout(
            plan,
            q,
            Some(q_offsets),
            kv_cache,
            block_table,
            cache_seqlens,
            softmax_scale,
            out,
            lse,
            stream,
        )
    }

    /// Validate the packed layout's `q_offsets` on the host (one synchronization): see
    /// [`crate::validate::validate_q_offsets`].
    pub fn check_q_offsets(&self, shape: &DecodeShape, q_offsets: &DeviceBuffer<i32>) -> Result<()> {
        validate_shape(shape)?;
        let mut o = vec![0i32; q_offsets.len()];
        q_offsets.copy_to(&mut o[..])?;
        crate::validate::validate_q_offsets(shape, &o)
    }

    /// The typed entry points' common path.
    #[allow(clippy::too_many_arguments)]
    fn decode_into_layout<T: Element>(
        &self,
        plan: &Plan,
        q: &DeviceBuffer<T>,
        q_offsets: Option<&DeviceBuffer<i32>>,
        kv_cache: &DeviceBuffer<T>,
        block_table: &DeviceBuffer<i32>,
        cache_seqlens: &DeviceBuffer<i32>,
        softmax_scale: Option<f32>,
        out: &mut DeviceBuffer<T>,
        lse: &mut DeviceBuffer<f32>,
        stream: &Stream,
    ) -> Result<()> {
        let bufs = typed_buffers(
            &plan.shape,
            q,
            q_offsets,
            kv_cache,
            block_table,
            cache_seqlens,
            out,
            lse,
        )?;
        // SAFETY: the buffers are live device allocations of the lengths the plan's shape
        // needs (validated above), borrowed for the call; the kernels run in stream order and
        // the caller owns synchronization before reading `out`/`lse` or freeing inputs.
        unsafe { self.decode_raw(plan, T::DTYPE, bufs, softmax_scale, stream.as_inner()) }
    }

    /// The raw entry point, for interop with other CUDA libraries (device pointers and the
    /// stream from PyTorch, say). Checks the shape, alignments, the scale and the stream's
    /// context; on error nothing is launched and nothing written. Capturable in a CUDA graph.
    ///
    /// # Safety
    /// Every address in `bufs` must point to live device memory of the plan's context with
    /// the length and element type that `plan.shape()` and `dtype` imply (q, cache and out 16-bit
    /// of `dtype`; block table and seqlens i32; lse f32), must stay valid until the stream has
    /// run the launch (in a graph: at every replay), and `out`/`lse` must not overlap the
    /// inputs. `stream` is a stream of the plan's context (or null, the legacy default stream).
    /// Seqlens other than the plan's are memory-safe (docs/design.md, "Bounds safety"), with
    /// the result described there.
    pub unsafe fn decode_raw(
        &self,
        plan: &Plan,
        dtype: Dtype,
        bufs: RawBuffers,
        softmax_scale: Option<f32>,
        stream: CUstream,
    ) -> Result<()> {
        if plan.shape.kv_format != KvFormat::Elem16 {
            return Err(EtapError::Invalid {
                arg: "kv_cache",
                why: "the plan's cache is FP8: decode_fp8_into / decode_fp8_raw".into(),
            });
        }
        self.launch(plan, dtype, bufs, softmax_scale, 1.0, stream)
    }

    /// Decode over an FP8 cache (a plan made for a shape `with_kv_format(Fp8...)`): q and out
    /// bf16 or fp16 (`T`), `kv_cache` the cache's bytes in the plan's format, `kv_scale` the per-tensor
    /// format's scale (finite, positive; `None` for FlashMLA's 656-byte format, whose scales
    /// are in the cache). Checked and launched as [`Decoder::decode_into`]. See
    /// `kernels/src/decode/fp8.rs` for what the kernel does, and `etap::fp8` for the formats
    /// and their quantizers.
    ///
    /// The kernel computes in f16 (whatever q and out are): q, the 656 format's RoPE part and its
    /// dequantized values must be below 65520 in magnitude, or the output is not finite; a
    /// 656 block scale below 2^-24 reads as zero (docs/design.md, §4d).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_fp8_into<T: Element>(
        &self,
        plan: &Plan,
        q: &DeviceBuffer<T>,
        kv_cache: &DeviceBuffer<u8>,
        kv_scale: Option<f32>,
        block_table: &DeviceBuffer<i32>,
        cache_seqlens: &DeviceBuffer<i32>,
        softmax_scale: Option<f32>,
        out: &mut DeviceBuffer<T>,
        lse: &mut DeviceBuffer<f32>,
        stream: &Stream,
    ) -> Result<()> {
        let bufs = typed_buffers(&plan.shape, q, None, kv_cache, block_table, cache_seqlens, out, lse)?;
        // SAFETY: as decode_into's: live buffers of the validated lengths, borrowed for the call.
        unsafe { self.decode_fp8_raw(plan, T::DTYPE, bufs, kv_scale, softmax_scale, stream.as_inner()) }
    }

    /// [`Decoder::decode_fp8_into`] in the packed query layout (a plan made for a shape
    /// `with_kv_format(Fp8...)` and `with_packed_q`): q, `q_offsets`, out and lse as in
    /// [`Decoder::decode_packed_into`], the cache and `kv_scale` as in
    /// [`Decoder::decode_fp8_into`].
    #[allow(clippy::too_many_arguments)]
    pub fn decode_fp8_packed_into<T: Element>(
        &self,
        plan: &Plan,
        q: &DeviceBuffer<T>,
        q_offsets: &DeviceBuffer<i32>,
        kv_cache: &DeviceBuffer<u8>,
        kv_scale: Option<f32>,
        block_table: &DeviceBuffer<i32>,
        cache_seqlens: &DeviceBuffer<i32>,
        softmax_scale: Option<f32>,
        out: &mut DeviceBuffer<T>,
        lse: &mut DeviceBuffer<f32>,
        stream: &Stream,
    ) -> Result<()> {
        check_offsets_len(&plan.shape, q_offsets.len())?;
        let bufs = typed_buffers(
            &plan.shape,
            q,
            Some(q_offsets),
            kv_cache,
            block_table,
            cache_seqlens,
            out,
            lse,
        )?;
        // SAFETY: as decode_into's: live buffers of the validated lengths, borrowed for the call.
        unsafe { self.decode_fp8_raw(plan, T::DTYPE, bufs, kv_scale, softmax_scale, stream.as_inner()) }
    }

    /// [`Decoder::decode_fp8_into`]'s raw entry point (`bufs.kv_cache`: the FP8 cache's bytes;
    /// q and out of `dtype`).
    ///
    /// # Safety
    /// As [`Decoder::decode_raw`], with the cache `shape.cache_len()` bytes.
    pub unsafe fn decode_fp8_raw(
        &self,
        plan: &Plan,
        dtype: Dtype,
        bufs: RawBuffers,
        kv_scale: Option<f32>,
        softmax_scale: Option<f32>,
        stream: CUstream,
    ) -> Result<()> {
        let kv_scale = match (plan.shape.kv_format, kv_scale) {
            (KvFormat::Elem16, _) => {
                return Err(EtapError::Invalid {
                    arg: "kv_cache",
                    why: "the plan's cache is 16-bit: decode_into / decode_raw".into(),
                })
            }
            (KvFormat::Fp8Flashmla656, None) => 1.0,
            (KvFormat::Fp8Flashmla656, Some(_)) => {
                return Err(EtapError::Invalid {
                    arg: "kv_scale",
                    why: "FlashMLA's 656-byte format carries its scales in the cache".into(),
                })
            }
            (KvFormat::Fp8PerTensor, Some(s)) if s.is_finite() && s > 0.0 => s,
            (KvFormat::Fp8PerTensor, s) => {
                return Err(EtapError::Invalid {
                    arg: "kv_scale",
                    why: format!("the per-tensor format needs a finite, positive scale, got {s:?}"),
                })
            }
        };
        self.launch(plan, dtype, bufs, softmax_scale, kv_scale, stream)
    }

    /// The decode launch of every entry point: checks, tensor maps, the parameter block.
    ///
    /// # Safety
    /// As [`Decoder::decode_raw`].
    unsafe fn launch(
        &self,
        plan: &Plan,
        dtype: Dtype,
        bufs: RawBuffers,
        softmax_scale: Option<f32>,
        kv_scale: f32,
        stream: CUstream,
    ) -> Result<()> {
        let shape = plan.shape;
        validate_shape(&shape)?;
        bufs.check_alignment(["q", "kv_cache", "block_table", "cache_seqlens", "out", "lse"])?;
        match (shape.packed_q.is_some(), bufs.q_offsets) {
            (true, 0) => {
                return Err(EtapError::Invalid {
                    arg: "q_offsets",
                    why: format!(
                        "the plan's shape has the packed query layout: q_offsets are needed ({})",
                        if shape.kv_format == KvFormat::Elem16 {
                            "decode_packed_into"
                        } else {
                            "decode_fp8_packed_into"
                        }
                    ),
                })
            }
            (false, a) if a != 0 => {
                return Err(EtapError::Invalid {
                    arg: "q_offsets",
                    why: "given, but the plan's shape has the uniform query layout (DecodeShape::with_packed_q)".into(),
                })
            }
            (_, a) if a % 4 != 0 => {
                return Err(EtapError::Misaligned {
                    arg: "q_offsets",
                    align: 4,
                    addr: a,
                })
            }
            _ => {}
        }
        let scale = softmax_scale.unwrap_or(1.0 / (D_QK as f32).sqrt());
        if !(scale.is_finite() && scale > 0.0) {
            return Err(EtapError::Invalid {
                arg: "softmax_scale",
                why: format!("{scale} is not finite and positive"),
            });
        }
        check_context(plan, stream)?;
        let map_base = plan.maps_for(bufs.q, bufs.kv_cache, stream)?;
        // The kernels' parameter block (the contract's type): device addresses as pointers.
        let mut params = DecodeParams {
            q_map: map_base as *const TensorMap,
            kv_map: (map_base + std::mem::size_of::<TensorMap>() as u64) as *const TensorMap,
            block_table: bufs.block_table as *const i32,
            seqlens: bufs.cache_seqlens as *const i32,
            q_offsets: bufs.q_offsets as *const i32,
            ranges: plan.ranges.as_device_ptr().as_raw() as *const etap_core::WorkRange,
            split_offsets: plan.split_offsets.as_device_ptr().as_raw() as *const u32,
            out: bufs.out as *mut u16,
            lse: bufs.lse as *mut f32,
            o_accum: plan.o_accum.as_device_ptr().as_raw() as *mut f32,
            lse_accum: plan.lse_accum.as_device_ptr().as_raw() as *mut f32,
            counters: plan.counters.as_device_ptr().as_raw() as *mut u32,
            kv: bufs.kv_cache as *const u8,
            batch: shape.batch as u32,
            s_q: shape.s_q as u32,
            h_q: shape.h_q as u32,
            max_pages: shape.max_pages as u32,
            num_pages: shape.num_pages as u32,
            scale_log2: scale * std::f32::consts::LOG2_E,
            page_size: shape.page_size as u32,
            max_rows: shape.capacity() as u32,
            max_tiles: shape.max_tiles() as u32,
            total_q: shape.packed_q.unwrap_or(0) as u32,
            kv_stride: shape.kv_page_stride_rows() as u32,
            kv_scale,
        };
        let tiling = plan.tiling;
        let kernel = tiling.kernel_for(dtype, shape.kv_format)?;
        // Cooperative: the CTAs that share a request wait for each other's partial results
        // before merging them (kernels/src/merge.rs), so they must all be resident.
        launch_cooperative(
            self.kernels().get(kernel),
            (tiling.groups, plan.parts),
            kernel.threads(),
            kernel.smem_bytes(),
            stream,
            &mut [&mut params as *mut DecodeParams as *mut c_void],
        )
    }
}

/// The typed entry points' buffers, their lengths checked against `shape` (the cache in
/// elements of its own type: q's dtype, or bytes for an FP8 format), as raw addresses.
#[allow(clippy::too_many_arguments)]
fn typed_buffers<T: Element, C: cust::memory::DeviceCopy>(
    shape: &DecodeShape,
    q: &DeviceBuffer<T>,
    q_offsets: Option<&DeviceBuffer<i32>>,
    kv_cache: &DeviceBuffer<C>,
    block_table: &DeviceBuffer<i32>,
    cache_seqlens: &DeviceBuffer<i32>,
    out: &DeviceBuffer<T>,
    lse: &DeviceBuffer<f32>,
) -> Result<RawBuffers> {
    validate_lengths(
        shape,
        q.len(),
        kv_cache.len(),
        block_table.len(),
        cache_seqlens.len(),
        out.len(),
        lse.len(),
    )?;
    Ok(RawBuffers {
        q: q.as_device_ptr().as_raw(),
        kv_cache: kv_cache.as_device_ptr().as_raw(),
        block_table: block_table.as_device_ptr().as_raw(),
        cache_seqlens: cache_seqlens.as_device_ptr().as_raw(),
        out: out.as_device_ptr().as_raw(),
        lse: lse.as_device_ptr().as_raw(),
        q_offsets: q_offsets.map_or(0, |o| o.as_device_ptr().as_raw()),
    })
}

/// `q_offsets` has one entry per request and one more.
fn check_offsets_len(shape: &DecodeShape, len: usize) -> Result<()> {
    if len != shape.batch + 1 {
        return Err(EtapError::Length {
            arg: "q_offsets",
            expected: shape.batch + 1,
            got: len,
        });
    }
    Ok(())
}

/// `cache_seqlens` has one entry per request.
fn check_seqlens_len(shape: &DecodeShape, len: usize) -> Result<()> {
    if len != shape.batch {
        return Err(EtapError::Length {
            arg: "cache_seqlens",
            expected: shape.batch,
            got: len,
        });
    }
    Ok(())
}

/// `stream` belongs to the context the plan was made in.
///
/// # Safety
/// `stream` is a live stream handle (or null).
unsafe fn check_context(plan: &Plan, stream: CUstream) -> Result<()> {
    let ctx = driver::stream_context(stream)? as usize;
    if ctx != plan.ctx {
        return Err(EtapError::Invalid {
            arg: "stream",
            why: "belongs to another CUDA context (device) than the plan".into(),
        });
    }
    Ok(())
}
