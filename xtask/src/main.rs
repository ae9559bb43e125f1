//! `cargo xtask <command>`: build-ptx, bundle, bench (in progress).
fn main() {
    let ptx = etap_ptx_builder::build_ptx().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    println!("{}", ptx.display());
}
