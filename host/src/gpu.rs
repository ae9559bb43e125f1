//! Loading the kernels and launching them.
use crate::error::{EtapError, Result};
use cust::context::Context;
use cust::device::Device;
use cust::module::Module;

/// The register cap at kernel entry (see `etap_ptx_builder::MAX_REGISTERS`, which must agree:
/// 65536 registers over the decode kernel's 384 threads).
const fn etap_ptx_cap() -> u32 {
    168
}

/// Owns the CUDA context and the loaded kernel module.
pub struct Decoder {
    module: Module,
    num_sms: u32,
    _ctx: Context,
}

impl Decoder {
    /// Initialize CUDA on device 0, check that it is Hopper (compute capability 9.x), and load
    /// the embedded PTX.
    pub fn new() -> Result<Self> {
        match cust::init(cust::CudaFlags::empty()) {
            Ok(()) => {}
            Err(cust::error::CudaError::NoDevice) => return Err(EtapError::NoDevice),
            Err(e) => return Err(e.into()),
        }
        if Device::num_devices()? == 0 {
            return Err(EtapError::NoDevice);
        }
        let device = Device::get_device(0)?;
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
        let module = Module::from_ptx(
            crate::PTX,
            &[cust::module::ModuleJitOption::MaxRegisters(etap_ptx_cap())],
        )?;
        Ok(Decoder {
            module,
            num_sms,
            _ctx: ctx,
        })
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
pub fn decoder_or_skip(what: &str) -> Option<Decoder> {
    match Decoder::new() {
        Ok(d) => Some(d),
        Err(EtapError::NoDevice) => {
            println!("SKIP {what}: no CUDA device on this machine");
            None
        }
        Err(e) => panic!("{what}: a CUDA device is present but unusable: {e}"),
    }
}

/// Raise a kernel's dynamic shared-memory limit (above the default 48 KiB) to `bytes`.
pub fn set_dynamic_smem(func: &cust::function::Function, bytes: u32) -> Result<()> {
    use cust::sys::{cuFuncSetAttribute, CUfunction_attribute, CUresult};
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
