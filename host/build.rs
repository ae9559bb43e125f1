//! Builds the device crate to PTX (the same builder `cargo xtask build-ptx` uses) and leaves it
//! in OUT_DIR for `include_str!`, so `cargo build` and `cargo test` need no separate step.
fn main() {
    for p in etap_ptx_builder::source_dirs() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let ptx = match etap_ptx_builder::build_ptx() {
        Ok(p) => p,
        Err(e) => panic!("building the etap kernels to PTX failed:\n{e}"),
    };
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy(&ptx, out.join("etap_kernels.ptx")).expect("copy PTX into OUT_DIR");
}
