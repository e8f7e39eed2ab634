//! Network namespaces and veth pairs, created with iproute2 and removed on drop.
//!
//! Commands and closures are run inside a namespace by `setns(CLONE_NEWNET)` only. Unlike
//! `ip netns exec`, this keeps the caller's mount namespace, so `/sys/fs/bpf` (where lb pins its
//! maps) stays the host's bpffs and pins outlive the process as they must.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// Where iproute2 keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A unique prefix for this process's namespaces and pins: `<kind>-<pid>-<n>`.
pub fn unique_prefix(kind: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `program args` and fails with its stderr unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn enter(path: &PathBuf) -> std::io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: a valid namespace file descriptor; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with its loopback up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file under /run/netns.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).map(|_| ())
    }

    /// A command that will run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut command = Command::new(program);
        // Opened before fork: between fork and exec only async-signal-safe calls may run, and
        // opening a path allocates.
        let netns = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        // SAFETY: setns is async-signal-safe; `netns` stays open in the closure until exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.stdin(Stdio::null());
        Ok(command)
    }

    /// Runs `program args` inside this namespace and fails with its stderr unless it succeeds.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let output = self
            .command(program)?
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))?;
        if !output.status.success() {
            bail!(
                "{program} {} in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// Starts `command` (from [`Netns::command`]).
    pub fn spawn(&self, command: &mut Command) -> anyhow::Result<Child> {
        command
            .spawn()
            .with_context(|| format!("starting {command:?} in {}", self.name))
    }

    /// Runs `f` on a thread inside this namespace. Sockets created there stay in this namespace
    /// wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> anyhow::Result<T> {
                    enter(&path).context("entering the network namespace")?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// The ifindex and MAC address of the interface `name` inside this namespace.
    pub fn link(&self, name: &str) -> anyhow::Result<(u32, [u8; 6])> {
        let output = self.exec("ip", &["-j", "link", "show", "dev", name])?;
        let links: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("reading `ip -j link`")?;
        let index = links[0]["ifindex"].as_u64().context("no ifindex")?;
        let octets = links[0]["address"]
            .as_str()
            .context("no MAC address")?
            .split(':')
            .map(|octet| u8::from_str_radix(octet, 16))
            .collect::<Result<Vec<u8>, _>>()
            .context("a MAC address octet")?;
        Ok((
            u32::try_from(index)?,
            octets
                .try_into()
                .map_err(|_| anyhow::anyhow!("a MAC address of six octets"))?,
        ))
    }

    /// Sets `net.<key>` (e.g. `ipv4.ip_forward`) inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/net/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("writing {path} in {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: a failure here must not mask the test's own result.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A MAC address as `ip` writes it (`02:00:0a:00:00:02`).
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Creates a veth pair with one end in each namespace, both up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> anyhow::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// Deletes every namespace named `<prefix>-...`: what a run with this prefix created, including
/// the ones a build interrupted half-way had not handed to a guard yet.
pub fn delete_with_prefix(prefix: &str) {
    let ours = format!("{prefix}-");
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&ours) {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}
