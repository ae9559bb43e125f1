//! `cargo xtask <command>`: the project's chores, in Rust so they need nothing but cargo.
//!
//! - `build-ptx`: build the kernels to PTX and, where `ptxas` is installed, assemble them for
//!   sm_90a and print each kernel's registers, shared memory, stack frame, spills and local
//!   memory; fail on any spill, stack frame or local memory.
//! - `bundle`: put the release test binaries (and any release binaries of the workspace), the
//!   PTX and `run.sh` into `target/bundle/`, to run on a GPU machine that has no Rust.
//! - `bench [ARGS...]`: run the `etap-bench` package (`cargo run --release -p etap-bench`).
//! - `ptx-diff REV`: build the kernels of this tree and of revision `REV` and say, kernel by
//!   kernel, whether their PTX is the same: a change that leaves every kernel's PTX as it was
//!   needs no GPU run to show that the kernels still work.
use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use etap_ptx_builder as pb;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  build-ptx        build the kernels to PTX; with ptxas, print registers/spills per kernel and
                   fail on any spill, stack frame or local memory
  bundle           put release test binaries, binaries, the PTX and run.sh into target/bundle/
  bench [ARGS...]  run the benchmark: cargo run --release -p etap-bench -- ARGS
  ptx-diff REV     build the kernels of this tree and of git revision REV; print which kernels'
                   PTX differ (exit status 1 if any does)
";

/// The bundle must fit the device machine's transfer limit.
const BUNDLE_LIMIT: u64 = 64 << 20;

/// The script that runs the bundle on the GPU machine.
const RUN_SH: &str = include_str!("../run.sh");

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-ptx") if args.len() == 1 => build_ptx(),
        Some("bundle") if args.len() == 1 => bundle(),
        Some("bench") => {
            // The benchmark's own exit status (2: no CUDA device) passes through.
            return match bench(&args[1..]) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("ptx-diff") if args.len() == 2 => {
            return match ptx_diff(&args[1]) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(pb::workspace_root());
    cmd
}

// ---------------------------------------------------------------------------------------------
// build-ptx

fn build_ptx() -> Result<(), String> {
    let ptx = pb::build_ptx()?;
    println!("PTX: {}", ptx.display());
    let Some(ptxas) = pb::find_tool("ptxas") else {
        let msg = "ptxas not found, so the kernels were not assembled and their registers and \
                   spills were not checked (install it with `python3 -m pip install --target \
                   target/nvtools nvidia-cuda-nvcc-cu12`, or set ETAP_NVTOOLS; see .ci/run)";
        if pb::in_ci() {
            return Err(format!("{msg}; CI is set, so this is an error"));
        }
        eprintln!("warning: {msg}");
        return Ok(());
    };
    println!("ptxas: {} ({})", ptxas.display(), tool_version(&ptxas));
    let cubin = ptx.with_extension(format!("{}.cubin", pb::ARCH));
    let reports = pb::assemble(&ptxas, &ptx, &cubin)?;
    println!("cubin: {}", cubin.display());

    let text = fs::read_to_string(&ptx).map_err(|e| format!("reading {}: {e}", ptx.display()))?;
    let entries = pb::entry_points(&text);
    let reported: BTreeSet<&str> = reports.iter().map(|r| r.name.as_str()).collect();
    let unreported: Vec<&String> = entries.iter().filter(|e| !reported.contains(e.as_str())).collect();
    if reports.is_empty() || !unreported.is_empty() {
        return Err(format!(
            "ptxas reported on {} kernels but the PTX has {} entry points; missing: {unreported:?}",
            reports.len(),
            entries.len()
        ));
    }

    // HGMMA counts from the SASS, where cuobjdump is installed.
    let hgmma: Option<BTreeMap<String, usize>> = match pb::find_tool("cuobjdump") {
        Some(cuobjdump) => {
            let sass = pb::sass(&cuobjdump, &cubin)?;
            Some(
                pb::sass_by_function(&sass)
                    .into_iter()
                    .map(|(name, body)| (name, pb::hgmma_count(&body)))
                    .collect(),
            )
        }
        None => {
            eprintln!("note: cuobjdump not found; the HGMMA column is left empty");
            None
        }
    };

    let mut reports = reports;
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    let width = reports.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    println!();
    println!(
        "{:<width$} {:>5} {:>7} {:>6} {:>9} {:>9} {:>5} {:>6}  status",
        "kernel", "regs", "smem", "stack", "spill-st", "spill-ld", "lmem", "hgmma"
    );
    let mut dirty = Vec::new();
    for r in &reports {
        let hg = hgmma
            .as_ref()
            .map_or("-".to_string(), |m| m.get(&r.name).copied().unwrap_or(0).to_string());
        let status = if r.is_clean() { "ok" } else { "SPILLS/STACK/LMEM" };
        println!(
            "{:<width$} {:>5} {:>7} {:>6} {:>9} {:>9} {:>5} {:>6}  {status}",
            r.name, r.registers, r.shared_bytes, r.stack_frame_bytes, r.spill_stores, r.spill_loads, r.local_bytes, hg
        );
        if !r.is_clean() {
            dirty.push(r.name.as_str());
        }
    }
    println!("(smem counts static shared memory only; the kernels' dynamic shared memory is set at launch)");

    // ptxas's numbered advisories, e.g. injected warpgroup.arrive or serialized wgmma.
    let mut advisories: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for r in &reports {
        for a in &r.advisories {
            let code = a.split(')').next().unwrap_or(a).trim_start_matches('(').to_string();
            advisories.entry(code).or_default().push(r.name.as_str());
        }
    }
    for (code, kernels) in &advisories {
        let mut kernels = kernels.clone();
        kernels.dedup();
        let example = reports
            .iter()
            .flat_map(|r| &r.advisories)
            .find(|a| a.starts_with(&format!("({code})")));
        println!(
            "ptxas advisory {code} in {} kernel(s): {}",
            kernels.len(),
            example.map_or("", |s| s.as_str())
        );
    }

    if !dirty.is_empty() {
        return Err(format!(
            "{} kernel(s) spill or use a stack frame or local memory: {dirty:?}",
            dirty.len()
        ));
    }
    println!(
        "\n{} kernels, no spills, no stack frame, no local memory",
        reports.len()
    );
    Ok(())
}

fn tool_version(tool: &Path) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "version unknown".into())
}

// ---------------------------------------------------------------------------------------------
// bundle

/// One executable that cargo built, from its `--message-format=json` output.
#[derive(Debug, PartialEq, Eq)]
struct Artifact {
    /// The target's name (`etap_core`, `ptx_checks`, `etap-bench`).
    name: String,
    /// The target's first kind (`lib`, `test`, `bin`, ...).
    kind: String,
    /// Whether this is a test harness build of the target.
    test: bool,
    executable: PathBuf,
}

/// The executables among the `compiler-artifact` messages of cargo's JSON output.
fn executables(json_lines: &str) -> Result<Vec<Artifact>, String> {
    let mut out = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let msg: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("cargo JSON: {e}: {line}"))?;
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        out.push(Artifact {
            name: msg["target"]["name"].as_str().unwrap_or("unknown").to_string(),
            kind: msg["target"]["kind"][0].as_str().unwrap_or("unknown").to_string(),
            test: msg["profile"]["test"].as_bool().unwrap_or(false),
            executable: PathBuf::from(exe),
        });
    }
    Ok(out)
}

/// Run cargo with `args` (which must ask for `--message-format=json`) and return its stdout;
/// cargo's progress and warnings go to our stderr.
fn cargo_json(args: &[&str]) -> Result<String, String> {
    eprintln!("+ cargo {}", args.join(" "));
    let out = cargo()
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo {} failed ({})", args.join(" "), out.status));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("cargo output is not UTF-8: {e}"))
}

fn bundle() -> Result<(), String> {
    let root = pb::workspace_root();
    let ptx = pb::build_ptx()?;
    // xtask drives cargo; it is of no use on the GPU machine.
    let tests = cargo_json(&[
        "test",
        "--workspace",
        "--exclude",
        "xtask",
        "--release",
        "--no-run",
        "--message-format=json",
    ])?;
    let tests: Vec<Artifact> = executables(&tests)?.into_iter().filter(|a| a.test).collect();
    let bins = cargo_json(&[
        "build",
        "--workspace",
        "--exclude",
        "xtask",
        "--release",
        "--bins",
        "--message-format=json",
    ])?;
    let bins: Vec<Artifact> = executables(&bins)?
        .into_iter()
        .filter(|a| !a.test && a.kind == "bin")
        .collect();
    if tests.is_empty() {
        return Err("cargo built no test binaries".into());
    }

    let dir = root.join("target").join("bundle");
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    fs::create_dir_all(dir.join("tests")).map_err(|e| format!("creating {}: {e}", dir.display()))?;

    let mut copied: Vec<PathBuf> = Vec::new();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    for a in &tests {
        // Integration tests keep their name; unit tests of a library or binary get its kind.
        let base = if a.kind == "test" {
            a.name.clone()
        } else {
            format!("{}-{}", a.name, a.kind)
        };
        let mut name = base.clone();
        let mut n = 2;
        while !taken.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        copied.push(copy_exe(&a.executable, &dir.join("tests").join(&name))?);
    }
    for b in &bins {
        copied.push(copy_exe(&b.executable, &dir.join(&b.name))?);
    }
    fs::copy(&ptx, dir.join(pb::PTX_NAME)).map_err(|e| format!("copying the PTX: {e}"))?;
    write_exe(&dir.join("run.sh"), RUN_SH)?;
    fs::write(dir.join("BUNDLE.txt"), bundle_info(&root, &tests, &bins)).map_err(|e| format!("BUNDLE.txt: {e}"))?;

    let mut total = dir_size(&dir);
    if total >= BUNDLE_LIMIT {
        eprintln!("bundle is {:.1} MiB; stripping the binaries", mib(total));
        let strip = strip_tool().ok_or("the bundle is too large and neither strip nor llvm-strip was found")?;
        for exe in &copied {
            let ok = Command::new(&strip)
                .arg(exe)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(format!("{} {} failed", strip.display(), exe.display()));
            }
        }
        total = dir_size(&dir);
        if total >= BUNDLE_LIMIT {
            return Err(format!(
                "the bundle is {:.1} MiB even stripped (limit {} MiB)",
                mib(total),
                BUNDLE_LIMIT >> 20
            ));
        }
    }

    println!("bundle: {} ({:.1} MiB)", dir.display(), mib(total));
    for a in &tests {
        println!("  test binary: {}", a.executable.display());
    }
    for b in &bins {
        println!("  binary:      {}", b.executable.display());
    }
    println!("on the GPU machine: target/bundle/run.sh [--sanitize] [FILTER]");
    Ok(())
}

fn copy_exe(from: &Path, to: &Path) -> Result<PathBuf, String> {
    fs::copy(from, to).map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    Ok(to.to_path_buf())
}

fn write_exe(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    Ok(())
}

fn bundle_info(root: &Path, tests: &[Artifact], bins: &[Artifact]) -> String {
    let git = Command::new("git")
        .current_dir(root)
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    format!(
        "etap bundle: commit {git}, {} test binaries, {} binaries, PTX for {}\n",
        tests.len(),
        bins.len(),
        pb::ARCH
    )
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_size(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// `strip` from PATH, else `llvm-strip` from the toolchain's llvm-tools component.
fn strip_tool() -> Option<PathBuf> {
    if let Some(p) =
        env::var_os("PATH").and_then(|path| env::split_paths(&path).map(|d| d.join("strip")).find(|p| p.is_file()))
    {
        return Some(p);
    }
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = |args: &[&str]| {
        Command::new(&rustc)
            .args(args)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
    };
    let sysroot = out(&["--print", "sysroot"])?;
    let host = out(&["-vV"])?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))?;
    let p = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-strip");
    p.is_file().then_some(p)
}

// ---------------------------------------------------------------------------------------------
// bench

const BENCH_PACKAGE: &str = "etap-bench";

fn bench(args: &[String]) -> Result<ExitCode, String> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo metadata failed ({})", out.status));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))?;
    let found = meta["packages"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["name"] == BENCH_PACKAGE));
    if !found {
        return Err(format!(
            "the benchmark is not built yet: the workspace has no `{BENCH_PACKAGE}` package"
        ));
    }
    let status = cargo()
        .args(["run", "--release", "-p", BENCH_PACKAGE, "--"])
        .args(args)
        .status()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    if status.success() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{BENCH_PACKAGE} exited with {status}");
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .filter(|&c| c != 0)
        .map_or(ExitCode::FAILURE, ExitCode::from))
}

// ---------------------------------------------------------------------------------------------
// ptx-diff

/// Where `ptx-diff` checks out the other revision: a git worktree kept between runs, so that
/// its kernel build (in its own `target/ptx`) is incremental.
const DIFF_TREE: &str = "target/ptx-diff/tree";

/// Build this tree's kernels and those of `rev`; print each kernel's verdict. True when every
/// kernel's PTX is the same on both sides (rustc's text, before the register caps, which depend
/// only on this tree's contract; the hashes in symbol names, which depend on the checkout's
/// path, taken out).
fn ptx_diff(rev: &str) -> Result<bool, String> {
    let root = pb::workspace_root();
    let tree = root.join(DIFF_TREE);
    let git = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("git")
            .current_dir(&root)
            .args(args)
            .output()
            .map_err(|e| format!("could not run git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])?;
    let tree_arg = tree.to_str().ok_or("the worktree path is not UTF-8")?;
    if tree.join(".git").exists() {
        git(&["-C", tree_arg, "checkout", "--quiet", "--force", "--detach", &commit])?;
    } else {
        git(&["worktree", "prune"])?;
        git(&["worktree", "add", "--quiet", "--force", "--detach", tree_arg, &commit])?;
    }
    let (ours_raw, theirs_raw) = (pb::build_raw_ptx(&root)?, pb::build_raw_ptx(&tree)?);
    let ours = pb::without_path_hashes(&ours_raw);
    let theirs = pb::without_path_hashes(&theirs_raw);

    let ours_k: BTreeMap<String, &str> = pb::kernel_texts(&ours).into_iter().collect();
    let theirs_k: BTreeMap<String, &str> = pb::kernel_texts(&theirs).into_iter().collect();
    let names: BTreeSet<&String> = ours_k.keys().chain(theirs_k.keys()).collect();
    let differing: Vec<&str> = names
        .iter()
        .filter(|n| matches!((ours_k.get(**n), theirs_k.get(**n)), (Some(a), Some(b)) if a != b))
        .map(|n| n.as_str())
        .collect();
    // Kernels whose PTX differs may still assemble to the same machine code.
    let same_sass = if differing.is_empty() {
        BTreeSet::new()
    } else {
        same_sass(&root, &ours_raw, &theirs_raw, &differing)?
    };
    let width = names.iter().map(|n| n.len()).max().unwrap_or(6);
    let short = &commit[..12.min(commit.len())];
    println!("{:<width$}  {short} -> this tree", "kernel");
    let (mut same, mut sass_only) = (0, 0);
    for name in &names {
        let verdict = match (theirs_k.get(*name), ours_k.get(*name)) {
            (Some(a), Some(b)) if a == b => {
                same += 1;
                "same".to_string()
            }
            (Some(_), Some(_)) if same_sass.contains(name.as_str()) => {
                sass_only += 1;
                "same SASS (the PTX differs)".to_string()
            }
            (Some(a), Some(b)) => format!("DIFFERS ({} -> {} lines)", a.lines().count(), b.lines().count()),
            (None, Some(_)) => "NEW in this tree".to_string(),
            (Some(_), None) => "GONE from this tree".to_string(),
            (None, None) => unreachable!("every name comes from one side"),
        };
        println!("{name:<width$}  {verdict}");
    }
    let header_same = ours.split(".visible .entry").next() == theirs.split(".visible .entry").next();
    println!(
        "\n{same} of {} kernels the same, {sass_only} more with the same SASS; the module header \
         (before the first kernel) {}",
        names.len(),
        if header_same { "the same" } else { "DIFFERS" }
    );
    Ok(same + sass_only == names.len() && header_same)
}

/// Of the `kernels` whose PTX differs, those whose SASS is the same instruction for instruction
/// when both sides are assembled by this machine's ptxas as the PTX build does (the register
/// caps of this tree's contract on both); none where ptxas or cuobjdump is missing or a side
/// does not take the caps (another set of kernels), each with a note.
fn same_sass(root: &Path, ours: &str, theirs: &str, kernels: &[&str]) -> Result<BTreeSet<String>, String> {
    let (Some(ptxas), Some(cuobjdump)) = (pb::find_tool("ptxas"), pb::find_tool("cuobjdump")) else {
        eprintln!("note: ptxas or cuobjdump not found; kernels whose PTX differs are not compared as SASS");
        return Ok(BTreeSet::new());
    };
    let dir = root.join("target").join("ptx-diff");
    let mut sass = Vec::new();
    for (side, ptx) in [("ours", ours), ("theirs", theirs)] {
        let Ok(capped) = pb::with_register_caps(ptx) else {
            eprintln!("note: the {side} PTX does not take this tree's register caps; no SASS compared");
            return Ok(BTreeSet::new());
        };
        let (ptx_path, cubin) = (dir.join(format!("{side}.ptx")), dir.join(format!("{side}.cubin")));
        fs::write(&ptx_path, capped).map_err(|e| format!("writing {}: {e}", ptx_path.display()))?;
        pb::assemble(&ptxas, &ptx_path, &cubin)?;
        let by_fn: BTreeMap<String, String> = pb::sass_by_function(&pb::sass(&cuobjdump, &cubin)?)
            .into_iter()
            .collect();
        sass.push(by_fn);
    }
    println!(
        "(SASS compared as assembled by {} {})",
        ptxas.display(),
        tool_version(&ptxas)
    );
    Ok(kernels
        .iter()
        .filter(|k| match (sass[0].get(**k), sass[1].get(**k)) {
            (Some(a), Some(b)) => pb::sass_instructions(a) == pb::sass_instructions(b),
            _ => false,
        })
        .map(|k| k.to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_executables_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/core#etap-core@0.1.0","target":{"kind":["lib"],"crate_types":["lib"],"name":"etap_core"},"profile":{"test":true},"executable":"/w/target/release/deps/etap_core-1"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"etap_core"},"profile":{"test":false},"executable":null}
{"reason":"build-script-executed","package_id":"x"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"ptx_checks"},"profile":{"test":true},"executable":"/w/target/release/deps/ptx_checks-2"}
{"reason":"build-finished","success":true}"#;
        let a = executables(json).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].name, "etap_core");
        assert_eq!(a[0].kind, "lib");
        assert!(a[0].test);
        assert_eq!(a[1].executable, PathBuf::from("/w/target/release/deps/ptx_checks-2"));
    }

    #[test]
    fn run_sh_is_valid_bash() {
        let Ok(out) = Command::new("bash")
            .arg("-n")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("run.sh"))
            .output()
        else {
            eprintln!("bash not found; not checking run.sh");
            return;
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// run.sh in a scratch bundle with a stand-in test binary and a stand-in compute-sanitizer
    /// (shell scripts): it exports ETAP_REQUIRE_GPU=1 to the tests, `--sanitize` runs each of
    /// the three tools over `gpu_decode --exact sanitizer_cases` with one summary line each,
    /// and a reported hazard fails the run.
    #[test]
    fn run_sh_requires_the_gpu_and_sanitizes() {
        if Command::new("bash").arg("--version").output().is_err() {
            eprintln!("bash not found; not running run.sh");
            return;
        }
        let dir = std::env::temp_dir().join(format!("etap-run-sh-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("tests")).unwrap();
        fs::create_dir_all(dir.join("bin")).unwrap();
        write_exe(&dir.join("run.sh"), RUN_SH).unwrap();
        write_exe(
            &dir.join("tests/gpu_decode"),
            "#!/usr/bin/env bash\necho \"args: $* REQUIRE=$ETAP_REQUIRE_GPU\"\necho 'test result: ok. 1 passed; 0 failed'\n",
        )
        .unwrap();
        write_exe(
            &dir.join("bin/compute-sanitizer"),
            // As the real tool prints them (2025.3): racecheck has no ERROR SUMMARY line.
            "#!/usr/bin/env bash\n[ \"$1\" = --version ] && exit 0\ntool=$2; shift 4; \"$@\" || exit $?\n\
             if [ \"$tool\" = racecheck ]; then \
             echo \"========= RACECHECK SUMMARY: ${FAKE_HAZARDS:-0} hazards displayed (0 errors, 0 warnings)\"; \
             else echo '========= ERROR SUMMARY: 0 errors'; fi\n",
        )
        .unwrap();
        let run = |hazards: &str| {
            let path = format!(
                "{}:{}",
                dir.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let out = Command::new("bash")
                .arg(dir.join("run.sh"))
                .args(["--sanitize", "sanitizer_cases"])
                .env("PATH", path)
                .env("FAKE_HAZARDS", hazards)
                .env_remove("ETAP_REQUIRE_GPU")
                .env_remove("ETAP_SANITIZE")
                .env("ETAP_SANITIZE_OUT", dir.join("san"))
                .output()
                .unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let (ok, text) = run("0");
        assert!(ok, "{text}");
        assert!(text.contains("REQUIRE=1"), "{text}");
        for tool in ["memcheck", "racecheck", "synccheck"] {
            assert!(text.contains(&format!("sanitizer {tool}: ")), "{tool}: {text}");
            assert!(!text.contains(&format!("FAIL sanitizer-{tool}")), "{tool}: {text}");
        }
        let log = fs::read_to_string(dir.join("san/racecheck.log")).unwrap();
        assert!(log.contains("args: --exact sanitizer_cases --test-threads=1"), "{log}");
        let (ok, text) = run("3");
        assert!(!ok, "a racecheck hazard passed: {text}");
        assert!(text.contains("FAIL sanitizer-racecheck"), "{text}");
        let _ = fs::remove_dir_all(&dir);
    }
}
