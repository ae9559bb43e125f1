//! GPU presence for tests and tools: [`decoder_or_skip`] gives the decoder where a Hopper GPU
//! is present and skips (or, in the GPU-required mode, fails) where none is.
pub use crate::decoder::Decoder;
use crate::error::EtapError;

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
