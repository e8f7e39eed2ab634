//! Builds the eBPF object (`lb-ebpf`) for the BPF target with aya-build, so that `lb` embeds it.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        std::env::var("CARGO_MANIFEST_DIR").context("cargo sets CARGO_MANIFEST_DIR")?;
    let workspace = std::path::Path::new(&manifest_dir)
        .parent()
        .context("lb-userspace lives inside the workspace")?;
    let ebpf_dir = workspace.join("lb-ebpf");
    // The kernel program also compiles lb-common; rebuild it when the shared types change.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("lb-common").display()
    );
    let ebpf_dir = ebpf_dir.to_str().context("workspace path is UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
