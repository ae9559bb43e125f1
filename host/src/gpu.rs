//! Loading the kernels and launching them.
use crate::error::{EtapError, Result};
use cust::context::Context;
use cust::device::Device;
use cust::module::Module;
use cust::sys::CUfunction;
use etap_core::contract::Kernel;

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
        let mut ctx: cust::sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes one handle through a valid pointer.
        unsafe { cust::sys::cuCtxGetCurrent(&mut ctx) };
        if ctx.is_null() {
            return Self::on_device(0);
        }
        let mut device: cust::sys::CUdevice = 0;
        // SAFETY: a context is current (checked above); writes one int through a valid pointer.
        let rc = unsafe { cust::sys::cuCtxGetDevice(&mut device) };
        if rc != cust::sys::CUresult::CUDA_SUCCESS {
            return Err(EtapError::Device(format!("cuCtxGetDevice failed: {rc:?}")));
        }
        Self::on_device(device as u32)
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

/// For tests and tools: the decoder when a device is present, `None` (after printing why) when
/// the machine has no CUDA device, and a panic when a device is present but unusable (not
/// Hopper, or the module fails to load): a wrong device must fail, not skip.
///
/// With the environment variable `ETAP_REQUIRE_GPU` set (to anything but empty or `0`; see
/// [`gpu_required`]) a missing device panics too: the bundle's runner sets it, so a GPU test
/// that would skip on the GPU machine fails instead. CI leaves it unset and skips.
pub fn decoder_or_skip(what: &str) -> Option<Decoder> {
    match Decoder::new() {
        Ok(d) => Some(d),
        Err(EtapError::NoDevice) => {
            if gpu_required(std::env::var_os(REQUIRE_GPU_VAR).as_deref()) {
                panic!("{what}: no CUDA device on this machine, and {REQUIRE_GPU_VAR} is set: a GPU test may not skip");
            }
            // Written to stderr directly rather than with `println!`, which libtest captures
            // in tests: the skip and its reason show in every run (CI's log included).
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {what}: no CUDA device on this machine (set {REQUIRE_GPU_VAR}=1 to fail instead)"
            );
            None
        }
        Err(e) => panic!("{what}: a CUDA device is present but unusable: {e}"),
    }
}

/// The environment variable that turns [`decoder_or_skip`]'s skip into a failure.
pub const REQUIRE_GPU_VAR: &str = "ETAP_REQUIRE_GPU";

/// Whether a value of [`REQUIRE_GPU_VAR`] asks for a GPU: set and neither empty nor `0`.
pub fn gpu_required(value: Option<&std::ffi::OsStr>) -> bool {
    matches!(value, Some(v) if !v.is_empty() && v != "0")
}
