//! Builds the etap device crate (`kernels/`) to PTX for `sm_90a` with rustc's own NVPTX backend,
//! and inspects the result with NVIDIA's `ptxas`/`cuobjdump` where they are installed.
//!
//! One implementation serves both `host/build.rs` (which embeds the PTX, so `cargo build` and
//! `cargo test` need no separate step) and `cargo xtask build-ptx`. docs/build.md explains why
//! this replaces rust-cuda's `cuda_builder`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The NVPTX target triple the kernels are built for.
pub const TARGET: &str = "nvptx64-nvidia-cuda";
/// The GPU architecture: Hopper with its architecture-specific features (wgmma, setmaxnreg).
pub const ARCH: &str = "sm_90a";
/// The PTX ISA version the kernels need (LLVM's NVPTX feature name): 8.3 for
/// `fence.proxy.tensormap`. rustc calls it an unstable target feature and warns; it is passed
/// to LLVM as is.
pub const PTX_ISA: &str = "ptx83";
/// The register cap the module is JIT-compiled with on the device (cust's
/// `ModuleJitOption::MaxRegisters`) and assembled with here: 65536 registers over the decode
/// kernel's 384 threads, a multiple of 8. The decode kernel's warpgroups then trade registers
/// with `setmaxnreg`, which needs a cap at entry.
pub const MAX_REGISTERS: u32 = etap_core::DECODE_ENTRY_REGS;
/// File name of the PTX the builder leaves at a stable path under `target/ptx/`.
pub const PTX_NAME: &str = "etap_kernels.ptx";

/// The workspace root (the folder holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ptx-builder lives one level below the workspace root")
        .to_path_buf()
}

/// Folders whose files are inputs of the PTX build (for `cargo:rerun-if-changed`).
pub fn source_dirs() -> Vec<PathBuf> {
    let root = workspace_root();
    vec![
        root.join("kernels/src"),
        root.join("kernels/Cargo.toml"),
        root.join("core/src"),
        root.join("core/Cargo.toml"),
    ]
}

/// Environment variables an enclosing cargo (build script, clippy, a coverage tool) sets that
/// must not leak into the nested kernel build: they name the host's rustc wrapper, flags and
/// target, which mean nothing for nvptx.
const SCRUBBED_ENV: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "RUSTC_LINKER",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

/// Build the kernels to PTX and return the path of the PTX file
/// (`<root>/target/ptx/etap_kernels.ptx`).
///
/// Runs `cargo rustc` on `kernels/Cargo.toml` for `nvptx64-nvidia-cuda` with
/// `-Zbuild-std=core` and `-C target-cpu=sm_90a`. The unstable flags (`-Zbuild-std`, the
/// `abi_ptx` and `asm_experimental_arch` features) are enabled with `RUSTC_BOOTSTRAP=1` for this
/// build only. The nested build uses its own target folder, so a build script can call it
/// without waiting on the lock of the build that runs the script.
pub fn build_ptx() -> Result<PathBuf, String> {
    let root = workspace_root();
    let ptx = build_raw_ptx(&root)?;
    let stable = root.join("target").join("ptx").join(PTX_NAME);
    let ptx = with_register_caps(&ptx)?;
    fs::write(&stable, ptx).map_err(|e| format!("writing {}: {e}", stable.display()))?;
    Ok(stable)
}

/// The PTX text of the kernels of the source tree at `root` (a checkout of this workspace, of
/// any revision), as rustc writes it: [`build_ptx`]'s build, in `<root>/target/ptx`, without the
/// register caps.
pub fn build_raw_ptx(root: &Path) -> Result<String, String> {
    let target_dir = root.join("target").join("ptx");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    // Cargo's per-package variables (CARGO_PKG_*, CARGO_CFG_*, DEP_*) are harmless, but the
    // build-script ones that name features would confuse nothing either; leave them.
    cmd.current_dir(root.join("kernels"))
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("rustc")
        .arg("--manifest-path")
        .arg(root.join("kernels").join("Cargo.toml"))
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("-Zbuild-std=core")
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--")
        .arg("-C")
        .arg(format!("target-cpu={ARCH}"))
        // PTX ISA 8.3 for `fence.proxy.tensormap` (tensor maps kept in global memory).
        .arg("-C")
        .arg(format!("target-feature=+{PTX_ISA}"));
    let out = cmd
        .output()
        .map_err(|e| format!("could not run cargo for the kernel build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kernel build failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let built = target_dir.join(TARGET).join("release").join(PTX_NAME);
    fs::read_to_string(&built).map_err(|e| format!("reading {}: {e}", built.display()))
}

/// `ptx` with a `.maxnreg` directive on each kernel whose entry cap
/// (`etap_core::contract::Kernel::entry_regs`) is below the module's (`DECODE_ENTRY_REGS`, given
/// at load as a JIT option): rustc has no attribute for it, and without it a CTA of that
/// kernel's threads would not fit the register file (the launch fails), while the kernel's
/// `setmaxnreg` counts assume the cap. The directive goes between the entry's parameter list and
/// its body.
pub fn with_register_caps(ptx: &str) -> Result<String, String> {
    let mut out = ptx.to_string();
    for k in etap_core::contract::Kernel::ALL {
        if k.entry_regs() >= etap_core::DECODE_ENTRY_REGS {
            continue;
        }
        let head = format!(".entry {}(", k.name());
        let at = out
            .find(&head)
            .ok_or_else(|| format!("the PTX defines no kernel {}", k.name()))?;
        let body = at + out[at..].find("\n{").ok_or_else(|| format!("{}: no body", k.name()))?;
        out.insert_str(body, &format!("\n.maxnreg {}", k.entry_regs()));
    }
    Ok(out)
}

/// Where to look for NVIDIA's command-line tools: `ETAP_NVTOOLS` (a folder searched
/// recursively, as filled by `pip install --target`), the PyPI wheels that `.ci/run` installs
/// under `target/nvtools`, `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda`, then `PATH`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    if let Some(p) = env::var_os(format!("ETAP_{}", name.to_uppercase())) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("ETAP_NVTOOLS") {
        roots.push(PathBuf::from(p));
    }
    roots.push(workspace_root().join("target").join("nvtools"));
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            roots.push(PathBuf::from(p));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    for r in &roots {
        if let Some(found) = find_file(r, name, 6) {
            return Some(found);
        }
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn find_file(dir: &Path, name: &str, depth: u32) -> Option<PathBuf> {
    let direct = dir.join("bin").join(name);
    if direct.is_file() {
        return Some(direct);
    }
    if depth == 0 {
        return None;
    }
    let mut entries: Vec<_> = fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            if let Some(f) = find_file(&e, name, depth - 1) {
                return Some(f);
            }
        }
    }
    None
}

/// What `ptxas -v` says about one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelReport {
    pub name: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_frame_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Local memory (`lmem`), a sign of a register array indexed at run time.
    pub local_bytes: u32,
    /// ptxas's numbered advisories about this kernel, e.g. `(C7519) warpgroup.arrive is
    /// injected ...` or `(C7510) ... wgmma.mma_async instructions are serialized ...`.
    pub advisories: Vec<String>,
}

impl KernelReport {
    /// True when the kernel keeps everything in registers and shared memory.
    pub fn is_clean(&self) -> bool {
        self.spill_stores == 0 && self.spill_loads == 0 && self.stack_frame_bytes == 0 && self.local_bytes == 0
    }
}

/// Assemble `ptx` for sm_90a with `ptxas -v`, write the cubin to `cubin`, and parse the
/// per-kernel resource report.
pub fn assemble(ptxas: &Path, ptx: &Path, cubin: &Path) -> Result<Vec<KernelReport>, String> {
    let out = Command::new(ptxas)
        .arg(format!("-arch={ARCH}"))
        .arg("-v")
        .arg("-warn-spills")
        .arg("-warn-lmem-usage")
        .arg(format!("-maxrregcount={MAX_REGISTERS}"))
        .arg(ptx)
        .arg("-o")
        .arg(cubin)
        .output()
        .map_err(|e| format!("could not run {}: {e}", ptxas.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("ptxas failed ({}):\n{text}", out.status));
    }
    Ok(parse_ptxas_report(&text))
}

/// Parse `ptxas -v` output into one report per kernel.
pub fn parse_ptxas_report(text: &str) -> Vec<KernelReport> {
    let mut reports: Vec<KernelReport> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            reports.push(KernelReport {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(cur) = reports.last_mut() else {
            continue;
        };
        if line.contains("bytes stack frame") {
            // `max`, so the properties of a non-inlined `.func` listed under an entry cannot
            // hide the entry's own (or the other way round).
            cur.stack_frame_bytes = cur.stack_frame_bytes.max(number_before(line, "bytes stack frame"));
            cur.spill_stores = cur.spill_stores.max(number_before(line, "bytes spill stores"));
            cur.spill_loads = cur.spill_loads.max(number_before(line, "bytes spill loads"));
        }
        if line.contains("Used") && line.contains("registers") {
            cur.registers = number_before(line, "registers");
            cur.shared_bytes = number_before(line, "bytes smem");
            cur.local_bytes = number_before(line, "bytes lmem");
        }
    }
    for line in text.lines() {
        const KEY: &str = "function '";
        let (Some(code_at), Some(fn_at)) = (line.find("(C"), line.rfind(KEY)) else {
            continue;
        };
        let name = line[fn_at + KEY.len()..].split('\'').next().unwrap_or("");
        if let Some(r) = reports.iter_mut().find(|r| r.name == name) {
            r.advisories.push(line[code_at..].trim().to_string());
        }
    }
    reports
}

/// The names of the kernels (`.entry` functions) in PTX text, in file order.
pub fn entry_points(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.by_ref().find(|w| *w == ".entry")?;
            let name = words.next()?.split('(').next()?;
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// PTX text cut into its kernels: each `.entry`'s name and its text, from its line to the next
/// entry's (or the end), in file order. The module's header before the first entry is not in
/// it.
pub fn kernel_texts(ptx: &str) -> Vec<(String, &str)> {
    let mut starts: Vec<(usize, String)> = Vec::new();
    let mut at = 0;
    for line in ptx.split_inclusive('\n') {
        if let Some(name) = entry_points(line).pop() {
            starts.push((at, name));
        }
        at += line.len();
    }
    let ends = starts.iter().skip(1).map(|(s, _)| *s).chain([ptx.len()]);
    starts
        .iter()
        .zip(ends)
        .map(|((start, name), end)| (name.clone(), &ptx[*start..end]))
        .collect()
}

/// `ptx` without the hashes that depend on where the crate was built from, so that two
/// checkouts of the same source give the same text: the crate disambiguators of mangled (v0)
/// symbol names (`Cs<hash>_` becomes `Cs_`) and the hash in the names of anonymous constants
/// (`anon_$_<hash>_$_` becomes `anon_$__$_`).
pub fn without_path_hashes(ptx: &str) -> String {
    let crates = drop_hashes(ptx, "Cs", |rest| {
        rest.starts_with('_') && rest[1..].starts_with(|c: char| c.is_ascii_digit())
    });
    drop_hashes(&crates, "anon_$_", |rest| rest.starts_with("_$_"))
}

/// `text` with the ASCII alphanumeric run after each `prefix` taken out where `ends` accepts
/// what follows the run.
fn drop_hashes(text: &str, prefix: &str, ends: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let (before, after) = rest.split_at(at + prefix.len());
        out.push_str(before);
        let hash = after.bytes().take_while(u8::is_ascii_alphanumeric).count();
        rest = if hash > 0 && ends(&after[hash..]) {
            &after[hash..]
        } else {
            after
        };
    }
    out.push_str(rest);
    out
}

/// True under continuous integration (env `CI` set, and not to `""`, `0` or `false`). The
/// ptxas/SASS checks then treat missing NVIDIA tools as an error instead of skipping.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
}

/// Count of HGMMA (wgmma) instructions in a function's SASS.
pub fn hgmma_count(sass: &str) -> usize {
    sass.lines().filter(|l| l.contains("HGMMA")).count()
}

fn number_before(line: &str, key: &str) -> u32 {
    let Some(pos) = line.find(key) else { return 0 };
    line[..pos]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Disassemble a cubin to SASS with `cuobjdump -sass`.
pub fn sass(cuobjdump: &Path, cubin: &Path) -> Result<String, String> {
    let out = Command::new(cuobjdump)
        .arg("-sass")
        .arg(cubin)
        .output()
        .map_err(|e| format!("could not run {}: {e}", cuobjdump.display()))?;
    if !out.status.success() {
        return Err(format!("cuobjdump failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The instructions of a function's SASS (as [`sass_by_function`] gives it), without their
/// addresses and encodings: what two builds compare on.
pub fn sass_instructions(body: &str) -> Vec<&str> {
    body.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("/*")?;
            let (addr, instr) = rest.split_once("*/")?;
            addr.chars()
                .all(|c| c.is_ascii_hexdigit())
                .then(|| instr.split(';').next().unwrap_or("").trim())
        })
        .collect()
}

/// Split `cuobjdump -sass` output into (kernel name, SASS text) pairs.
pub fn sass_by_function(sass: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in sass.lines() {
        if let Some(rest) = line.trim().strip_prefix("Function : ") {
            out.push((rest.trim().to_string(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_cut_at_their_entries_and_path_hashes_dropped() {
        let ptx = ".version 8.3\n.func _RNvCsAb12_12etap_kernels3foo()\n{\n}\n\
                   .visible .entry k_one(\n.param .u64 p\n)\n{\nret;\n}\n\
                   .visible .entry k_two(\n)\n{\ncall _RNvCsZz9_12etap_kernels3foo;\n}\n";
        let kernels = kernel_texts(ptx);
        let names: Vec<&str> = kernels.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["k_one", "k_two"]);
        assert!(kernels[0].1.starts_with(".visible .entry k_one(") && kernels[0].1.ends_with("ret;\n}\n"));
        assert!(kernels[1].1.starts_with(".visible .entry k_two(") && kernels[1].1.ends_with("foo;\n}\n"));
        let plain = without_path_hashes(ptx);
        assert!(plain.contains("_RNvCs_12etap_kernels3foo()") && plain.contains("call _RNvCs_12etap_kernels3foo;"));
        assert!(!plain.contains("Ab12") && !plain.contains("Zz9"));
        // Text that is not a crate root is left alone.
        assert_eq!(without_path_hashes("Cs Csx_y Cs1_ CsA"), "Cs Csx_y Cs1_ CsA");
        assert_eq!(
            without_path_hashes("[anon_$_db6e19_$_2+28] anon_$_x anon_$__$_1"),
            "[anon_$__$_2+28] anon_$_x anon_$__$_1"
        );
    }

    #[test]
    fn sass_instructions_drop_addresses_and_encodings() {
        let body = "        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */\n\
                    \x20                                                                            /* 0x000fe40000000800 */\n\
                    \x20       /*0010*/              @!P3 STS [R186], R3 ;  /* 0x00000003ba00b388 */\n";
        assert_eq!(sass_instructions(body), ["LDC R1, c[0x0][0x28]", "@!P3 STS [R186], R3"]);
    }

    #[test]
    fn register_caps_go_on_the_kernels_that_need_them() {
        use etap_core::contract::Kernel;
        let ptx: String = Kernel::ALL
            .iter()
            .map(|k| {
                format!(
                    ".visible .entry {}(\n\t.param .u64 p\n)  // @{}\n{{\n\tret;\n}}\n",
                    k.name(),
                    k.name()
                )
            })
            .collect();
        let capped = with_register_caps(&ptx).unwrap();
        for k in Kernel::ALL {
            let at = capped.find(&format!(".entry {}(", k.name())).unwrap();
            let head = &capped[at..at + capped[at..].find('{').unwrap()];
            let cap = format!(".maxnreg {}", k.entry_regs());
            assert_eq!(
                head.contains(&cap),
                k.entry_regs() < etap_core::DECODE_ENTRY_REGS,
                "{head}"
            );
        }
        assert!(capped.contains(".maxnreg 128"));
        assert!(with_register_caps("no kernels").is_err());
    }

    #[test]
    fn parses_a_ptxas_report() {
        let text = "ptxas info    : Compiling entry function 'etap_decode' for 'sm_90a'\n\
ptxas info    : Function properties for etap_decode\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 40 bytes lmem, 1024 bytes smem\n\
ptxas info    : Compiling entry function 'etap_combine' for 'sm_90a'\n\
ptxas info    : Function properties for etap_combine\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 30 registers, used 0 barriers\n";
        let r = parse_ptxas_report(text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "etap_decode");
        assert_eq!(r[0].registers, 168);
        assert_eq!(r[0].stack_frame_bytes, 8);
        assert_eq!(r[0].spill_stores, 4);
        assert_eq!(r[0].spill_loads, 12);
        assert_eq!(r[0].local_bytes, 40);
        assert_eq!(r[0].shared_bytes, 1024);
        assert!(!r[0].is_clean());
        assert_eq!(r[1].registers, 30);
        assert!(r[1].is_clean());
    }

    #[test]
    fn attaches_advisories_to_their_kernel() {
        let text = "ptxas info    : (C7519) warpgroup.arrive is injected in around line 4096 by compiler \
to allow use of registers in GMMA in function 'k2'\n\
ptxas info    : Compiling entry function 'k1' for 'sm_90a'\n\
ptxas info    : Used 30 registers, used 1 barriers\n\
ptxas info    : Compiling entry function 'k2' for 'sm_90a'\n\
ptxas info    : Used 40 registers, used 1 barriers\n";
        let r = parse_ptxas_report(text);
        assert!(r[0].advisories.is_empty());
        assert_eq!(r[1].advisories.len(), 1);
        assert!(r[1].advisories[0].starts_with("(C7519) warpgroup.arrive"));
    }

    #[test]
    fn finds_entry_points() {
        let ptx = ".version 8.0\n.target sm_90a\n.visible .entry etap_a(\n.param .u64 p\n)\n\
.entry etap_b()\n.visible .func helper(\n";
        assert_eq!(entry_points(ptx), ["etap_a", "etap_b"]);
    }
}
