//! Checks of the kernels' PTX that need no GPU: the embedded PTX is for sm_90a and has the
//! expected entry points; `ptxas` assembles every kernel without spills, stack frame or local
//! memory; the SASS of the wgmma test kernels really uses HGMMA.
//!
//! They check [`etap::PTX`], the PTX embedded in the host crate, so they also run from the
//! bundle (`cargo xtask bundle`) on a machine without the source tree. Where `ptxas` or
//! `cuobjdump` is missing, a check prints `SKIP: ...` and returns, unless env `CI` is set: then
//! it fails. `.ci/run` installs the tools into `target/nvtools`; `ETAP_NVTOOLS` names another
//! folder holding them.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use etap_core::contract::Kernel;
use etap_ptx_builder::{self as pb, KernelReport};

/// The kernels the PTX must define: the decode path's, by the names the host looks them up by
/// (`etap_core::contract::Kernel`, the one list both sides use), and the wgmma test GEMMs
/// (bf16/f16, A K-major or M-major (transposed), N = 8..64).
fn expected_entry_points() -> Vec<String> {
    let mut names: Vec<String> = Kernel::ALL.iter().map(|k| k.name().to_string()).collect();
    for dtype in ["bf16", "f16"] {
        for major in ["k", "m"] {
            for n in [8, 16, 32, 64] {
                names.push(format!("etap_test_gemm_{dtype}_{major}_n{n}"));
            }
        }
    }
    names
}

/// Print past libtest's output capture (which takes only `print!`/`eprint!`), so a skip shows
/// in every run.
fn notice(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The tool's path; `None` (after printing why) when it is missing and CI is not set.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = pb::find_tool(name) {
        return Some(p);
    }
    let why = format!(
        "{name} not found (install it with `python3 -m pip install --target target/nvtools {package}` \
         or set ETAP_NVTOOLS to a folder holding it; see .ci/run)"
    );
    if pb::in_ci() {
        panic!("{why}; CI is set, so this check cannot be skipped");
    }
    notice(&format!("SKIP: {why}"));
    None
}

struct Assembled {
    reports: Vec<KernelReport>,
    cubin: PathBuf,
}

/// The embedded PTX assembled for sm_90a, once per test process.
fn assembled(ptxas: &Path) -> &'static Assembled {
    static ASSEMBLED: OnceLock<Result<Assembled, String>> = OnceLock::new();
    let result = ASSEMBLED.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("etap-ptx-checks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let ptx = dir.join(pb::PTX_NAME);
        std::fs::write(&ptx, etap::PTX).map_err(|e| format!("writing {}: {e}", ptx.display()))?;
        let cubin = dir.join(format!("etap_kernels.{}.cubin", pb::ARCH));
        let reports = pb::assemble(ptxas, &ptx, &cubin)?;
        Ok(Assembled { reports, cubin })
    });
    match result {
        Ok(a) => a,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn ptx_targets_sm_90a_and_defines_the_kernels() {
    let ptx = etap::PTX;
    assert!(
        ptx.lines().any(|l| l.trim() == ".target sm_90a"),
        "the PTX is not for sm_90a"
    );
    assert!(
        ptx.lines().any(|l| l.trim() == ".address_size 64"),
        "the PTX is not 64-bit"
    );
    let entries = pb::entry_points(ptx);
    for name in expected_entry_points() {
        assert!(
            entries.contains(&name),
            "kernel {name} missing from the PTX; it has {entries:?}"
        );
    }
    for name in &entries {
        assert!(
            name.starts_with("etap_"),
            "entry point {name} is not an etap kernel (a mangled name?)"
        );
    }
}

/// The host and the decode kernels agree on the parameter block: each decode kernel's one
/// parameter is `size_of::<DecodeParams>()` bytes, 8-byte aligned (both sides compile the one
/// definition in `etap_core::contract`; this catches a kernel entry that takes another type).
#[test]
fn decode_kernels_take_the_contracts_parameter_block() {
    let size = std::mem::size_of::<etap_core::contract::DecodeParams>();
    for k in Kernel::ALL {
        if k == Kernel::Schedule {
            continue;
        }
        let want = format!(
            ".entry {}(\n\t.param .align 8 .b8 {}_param_0[{size}]\n)",
            k.name(),
            k.name()
        );
        assert!(
            etap::PTX.contains(&want),
            "{}: its parameter is not the {size}-byte DecodeParams",
            k.name()
        );
    }
}

#[test]
fn ptxas_assembles_every_kernel_without_spills_stack_or_lmem() {
    let Some(ptxas) = tool("ptxas", "nvidia-cuda-nvcc-cu12") else {
        return;
    };
    let a = assembled(&ptxas);
    let entries = pb::entry_points(etap::PTX);
    assert_eq!(
        a.reports.len(),
        entries.len(),
        "ptxas reported on {:?}, the PTX defines {entries:?}",
        a.reports.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    let dirty: Vec<&KernelReport> = a.reports.iter().filter(|r| !r.is_clean()).collect();
    assert!(
        dirty.is_empty(),
        "kernels with spills, a stack frame or local memory: {dirty:#?}"
    );
}

/// Each decode kernel runs at its contract's entry registers (`Kernel::entry_regs`: the FP8
/// kernels' 512 threads need a cap below the module's, which the PTX build writes as
/// `.maxnreg`), since `setmaxnreg` counts from there and a CTA over the register file does
/// not launch.
#[test]
fn decode_kernels_run_at_their_entry_registers() {
    let Some(ptxas) = tool("ptxas", "nvidia-cuda-nvcc-cu12") else {
        return;
    };
    let a = assembled(&ptxas);
    for k in Kernel::ALL {
        if k == Kernel::Schedule {
            continue;
        }
        let r = a.reports.iter().find(|r| r.name == k.name()).expect("reported");
        assert_eq!(r.registers, k.entry_regs(), "{}", k.name());
        assert!(
            k.threads() * k.entry_regs() <= etap_core::contract::REGISTER_FILE,
            "{}",
            k.name()
        );
    }
}

#[test]
fn no_kernel_has_serialized_wgmma() {
    let Some(ptxas) = tool("ptxas", "nvidia-cuda-nvcc-cu12") else {
        return;
    };
    let serialized: Vec<(&str, &str)> = assembled(&ptxas)
        .reports
        .iter()
        .flat_map(|r| r.advisories.iter().map(move |a| (r.name.as_str(), a.as_str())))
        .filter(|(_, a)| a.contains("serialized"))
        .collect();
    assert!(serialized.is_empty(), "ptxas serialized wgmma: {serialized:#?}");
}

#[test]
fn gemm_and_decode_sass_use_hgmma() {
    let Some(ptxas) = tool("ptxas", "nvidia-cuda-nvcc-cu12") else {
        return;
    };
    let Some(cuobjdump) = tool("cuobjdump", "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm") else {
        return;
    };
    let sass = pb::sass(&cuobjdump, &assembled(&ptxas).cubin).unwrap_or_else(|e| panic!("{e}"));
    let functions = pb::sass_by_function(&sass);
    let gemms: Vec<&(String, String)> = functions
        .iter()
        .filter(|(name, _)| name.starts_with("etap_test_gemm_") || name.starts_with("etap_decode_"))
        .collect();
    assert_eq!(
        gemms.len(),
        expected_entry_points()
            .iter()
            .filter(|n| n.starts_with("etap_test_gemm_") || n.starts_with("etap_decode_"))
            .count(),
        "test GEMM and decode kernels in the SASS"
    );
    for (name, body) in gemms {
        assert!(pb::hgmma_count(body) > 0, "{name} has no HGMMA instruction in its SASS");
    }
}
