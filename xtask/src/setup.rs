//! Installs what building and testing lb needs, only when it is missing, saying what and why.
//!
//! - Debian packages: iproute2 (`ip`, namespaces and veths), ethtool (checksum offload and GRO
//!   of test veths), bpftool (inspecting maps and programs), util-linux (`nsenter`); for the
//!   benchmark also iperf3, iptables, nftables and fonts-dejavu-core.
//! - The nightly toolchain's `rust-src` component: the eBPF crate is built with
//!   `-Z build-std=core` for the BPF target.
//! - bpf-linker, the linker of Rust eBPF objects, built against the nightly toolchain's own LLVM
//!   (a plain `cargo install bpf-linker` looks for a system LLVM that does not match).
//! - kubernetes-validate (PyPI), in a virtual environment under `target/` (made with Debian's
//!   python3 and python3-venv): the host tests check `deploy/` against Kubernetes' own schemas
//!   with it, offline (no API server here).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{display, run_command, workspace_root};

/// bpf-linker release known to build against the nightly's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain that builds the eBPF object (aya-build runs `rustup run nightly cargo`).
const EBPF_TOOLCHAIN: &str = "nightly";

/// kubernetes-validate release whose bundled schemas the deploy test checks against.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Where its virtual environment lives, under the workspace: `cargo clean` removes it with the
/// rest of the build.
const PYTHON_VENV: &str = "target/python-venv";

/// What a Debian package provides that a run needs: a command, a file, or a Python module of
/// the system's `python3`.
#[derive(Clone, Copy)]
enum Provides {
    Command(&'static str),
    File(&'static str),
    PythonModule(&'static str),
}

/// Something a run needs, the Debian package that provides it, and why.
type Need = (Provides, &'static str, &'static str);

/// What the tests and the demo run.
const PACKAGES: [Need; 4] = [
    (
        Provides::Command("ip"),
        "iproute2",
        "network namespaces, veths, addresses and routes",
    ),
    (
        Provides::Command("ethtool"),
        "ethtool",
        "checksum offload and GRO settings of the test veths",
    ),
    (
        Provides::Command("bpftool"),
        "bpftool",
        "inspecting lb's maps and programs",
    ),
    (
        Provides::Command("nsenter"),
        "util-linux",
        "running lb inside a node's network namespace by hand",
    ),
];

/// What the virtual environment of kubernetes-validate is made with. Debian ships `venv`'s
/// pip bootstrap (`ensurepip`) apart from `python3`.
const PYTHON_PACKAGES: [Need; 2] = [
    (
        Provides::Command("python3"),
        "python3",
        "the virtual environment of kubernetes-validate",
    ),
    (
        Provides::PythonModule("ensurepip"),
        "python3-venv",
        "`python3 -m venv` with pip inside",
    ),
];

/// What `cargo xtask bench` runs on top.
const BENCH_PACKAGES: [Need; 5] = [
    (
        Provides::Command("iperf3"),
        "iperf3",
        "throughput through each contender",
    ),
    (
        Provides::Command("iptables-legacy-restore"),
        "iptables",
        "kube-proxy's iptables-mode rule layout, the first peer",
    ),
    (
        Provides::Command("nft"),
        "nftables",
        "kube-proxy's nftables-mode rule layout, the second peer",
    ),
    (
        Provides::Command("trafgen"),
        "netsniff-ng",
        "trafgen, the packet generator of the packet-rate runs",
    ),
    (
        Provides::File("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        "fonts-dejavu-core",
        "the text of the benchmark's plots",
    ),
];

fn found(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(program).exists())
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn is_root() -> bool {
    lb_tests::privilege::is_root()
}

fn ensure_packages(needs: &[Need]) -> anyhow::Result<()> {
    let missing: Vec<_> = needs
        .iter()
        .filter(|(provides, _, _)| match provides {
            Provides::Command(program) => !found(program),
            Provides::File(path) => !Path::new(path).exists(),
            Provides::PythonModule(module) => !python_has(module),
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (provides, package, why) in &missing {
        let what = match provides {
            Provides::Command(program) => format!("`{program}`"),
            Provides::File(path) => path.to_string(),
            Provides::PythonModule(module) => format!("Python's `{module}`"),
        };
        println!("xtask: installing Debian package {package} (for {what}: {why})");
    }
    let mut names: Vec<&str> = missing.iter().map(|(_, package, _)| *package).collect();
    names.dedup();
    if !is_root() {
        bail!(
            "missing {}: install them with `sudo apt-get install -y {}`",
            names.join(", "),
            names.join(" ")
        );
    }
    run_command(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&names)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

fn rustup() -> Command {
    let mut command = Command::new("rustup");
    command.stdin(Stdio::null());
    command
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = rustup()
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (lb builds its eBPF object with rustup's nightly toolchain)")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|line| line.starts_with(EBPF_TOOLCHAIN))
    {
        println!("xtask: installing the {EBPF_TOOLCHAIN} toolchain (the eBPF object needs it)");
        run_command(rustup().args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = rustup()
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.starts_with("rust-src"))
    {
        println!(
            "xtask: installing rust-src for {EBPF_TOOLCHAIN} (the eBPF crate is built with -Z \
             build-std=core)"
        );
        run_command(rustup().args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
    }
    Ok(())
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let sysroot = Command::new("rustc")
        .args([&format!("+{EBPF_TOOLCHAIN}"), "--print", "sysroot"])
        .output()
        .context("asking the nightly rustc for its sysroot")?;
    let nightly_lib = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim()).join("lib");
    let soname = std::fs::read_dir(&nightly_lib)
        .with_context(|| format!("listing {}", nightly_lib.display()))?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", nightly_lib.display()))?;
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let llvm_major = soname
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|major| major.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM version from {soname}"))?
        .to_owned();
    println!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object), built against \
         the {EBPF_TOOLCHAIN} toolchain's LLVM {llvm_major} ({soname}); about a minute"
    );
    // The linker finds libLLVM through this prefix at build time and, via its rpath, at run
    // time: it must stay in place.
    let prefix = cargo_home().join("lb-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", soname.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(nightly_lib.join(&soname), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    let mut install = Command::new("cargo");
    install
        .args([
            &format!("+{EBPF_TOOLCHAIN}"),
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .stdin(Stdio::null());
    run_command(&mut install)?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but does not run; is {} on PATH? ({})",
            cargo_home().join("bin").display(),
            display(&install)
        );
    }
    Ok(())
}

/// The kubernetes-validate command of the workspace's virtual environment; the deploy test
/// finds it through `LB_KUBERNETES_VALIDATE`.
pub fn kubernetes_validate() -> PathBuf {
    workspace_root()
        .join(PYTHON_VENV)
        .join("bin/kubernetes-validate")
}

/// The version `command --version` prints, if it runs.
fn version_of(command: &Path) -> Option<String> {
    let output = Command::new(command)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn ensure_kubernetes_validate() -> anyhow::Result<()> {
    let validate = kubernetes_validate();
    if version_of(&validate).as_deref() == Some(KUBERNETES_VALIDATE_VERSION) {
        return Ok(());
    }
    ensure_packages(&PYTHON_PACKAGES)?;
    let venv = workspace_root().join(PYTHON_VENV);
    println!(
        "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (PyPI) into {}: \
         the host tests check deploy/ against Kubernetes' schemas with it",
        venv.display()
    );
    // --clear: a virtual environment left by another Python, or half made, starts over.
    run_command(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .stdin(Stdio::null()),
    )?;
    run_command(
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
            ])
            .stdin(Stdio::null()),
    )?;
    match version_of(&validate) {
        Some(version) if version == KUBERNETES_VALIDATE_VERSION => Ok(()),
        other => bail!(
            "{} was installed but reports {other:?}, not {KUBERNETES_VALIDATE_VERSION}",
            validate.display()
        ),
    }
}

/// Installs whatever is missing; quick and silent when nothing is.
pub fn ensure() -> anyhow::Result<()> {
    ensure_packages(&PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_kubernetes_validate()?;
    Ok(())
}

/// [`ensure`], plus what the benchmark runs (iperf3, iptables, nftables, a font for the plots).
pub fn ensure_bench() -> anyhow::Result<()> {
    ensure()?;
    ensure_packages(&BENCH_PACKAGES)
}
