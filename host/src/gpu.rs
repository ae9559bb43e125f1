//! Loading the kernels and launching them.
use crate::error::{EtapError, Result};
use cust::context::Context;
use cust::device::Device;
use cust::module::Module;

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
        cust::init(cust::CudaFlags::empty())?;
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
        let module = Module::from_ptx(crate::PTX, &[])?;
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
