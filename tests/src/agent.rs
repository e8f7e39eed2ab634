//! An `lb agent` process inside a namespace, and the `lb` command line for inspection.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

/// How long an agent may take to attach and program its first sync.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping agent gets before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The line the agent logs once the first sync is programmed.
const READY_MARKER: &str = "ready: watching";
/// Where bpffs is mounted; runs pin under `<BPFFS>/<prefix>`, never in lb's default directory.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The pin directory of the run named `prefix`.
pub fn pin_dir(prefix: &str) -> PathBuf {
    Path::new(BPFFS).join(prefix)
}

/// The `lb` binary: `$LB_BIN`, else `lb` next to the running test's `deps` directory
/// (`target/<profile>/lb`).
pub fn lb_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LB_BIN") {
        let path = PathBuf::from(path);
        // Test binaries run in their package's directory, so a relative path would silently
        // mean something else than where the caller stood.
        if !path.is_absolute() {
            bail!("LB_BIN must be an absolute path, got {}", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("the test binary is not inside a cargo target directory")?;
    let lb = profile_dir.join("lb");
    if !lb.exists() {
        bail!(
            "{} does not exist: build it first (`cargo build -p lb-userspace`, which `cargo xtask \
             test` does) or set LB_BIN",
            lb.display()
        );
    }
    Ok(lb)
}

/// The `lb` binary named by `$LB_BIN` (absolute), for programs that do not live in cargo's
/// test layout (the benchmark).
pub fn lb_binary_from_env() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(
        std::env::var_os("LB_BIN").context("set LB_BIN to the lb binary (cargo xtask does)")?,
    );
    if !path.is_absolute() || !path.exists() {
        bail!(
            "LB_BIN must be the absolute path of the lb binary, got {}",
            path.display()
        );
    }
    Ok(path)
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `lb --pin-dir <pin_dir> args...` (in the current namespace) and returns its stdout.
pub fn lb(lb: &Path, pin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    lb_with(Command::new(lb), lb, pin_dir, args)
}

/// [`lb`] run inside `node`, for the commands that look at its interfaces (`lb explain`).
pub fn lb_in(node: &Netns, lb: &Path, pin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    lb_with(node.command(lb)?, lb, pin_dir, args)
}

fn lb_with(
    mut command: Command,
    lb: &Path,
    pin_dir: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let output = command
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", lb.display()))?;
    if !output.status.success() {
        bail!(
            "lb {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// How to run an agent.
#[derive(Clone, Copy, Debug)]
pub struct AgentOptions<'a> {
    /// The `lb` binary.
    pub lb: &'a Path,
    pub pin_dir: &'a Path,
    /// `--manifests`, unless `extra_args` name a `--kubeconfig` (the Kubernetes API source).
    pub manifests: &'a Path,
    pub interfaces: &'a [String],
    /// Where the agent keeps its last good objects (`--state-dir`).
    pub state_dir: &'a Path,
    /// Where its log goes.
    pub log: &'a Path,
    /// More `lb agent` flags.
    pub extra_args: &'a [&'a str],
}

/// The flag that lets the program redirect into veths: the harness's topologies enable GRO on
/// every veth peer, which is what such redirects need.
pub const REDIRECT_VETH: &str = "--xdp-redirect-veth";
/// `lb agent` flag: no socket hooks.
pub const NO_SOCKET_HOOKS: &str = "--no-socket-hooks";
/// `lb agent` flag: the API server's kubeconfig (instead of a manifest directory).
pub const KUBECONFIG: &str = "--kubeconfig";
/// `lb agent` flag: the cgroup the socket hooks apply to.
pub const SOCKET_CGROUP: &str = "--socket-cgroup";

/// A running `lb agent`; stopped (SIGTERM, then SIGKILL) on drop. The dataplane it attached
/// stays until `lb reset`.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent in `node` and waits until it reports ready.
    pub fn start(node: &Netns, options: &AgentOptions<'_>) -> anyhow::Result<Self> {
        let mut agent = Self::spawn(node, options)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Starts the agent in `node` without waiting. It is killed if this thread exits first.
    pub fn spawn(node: &Netns, options: &AgentOptions<'_>) -> anyhow::Result<Self> {
        let log_file = File::create(options.log)
            .with_context(|| format!("creating {}", options.log.display()))?;
        let mut command = node.command(options.lb)?;
        command
            .arg("--pin-dir")
            .arg(options.pin_dir)
            .arg("agent")
            .args(
                (!options.extra_args.contains(&KUBECONFIG))
                    .then_some([Path::new("--manifests"), options.manifests])
                    .into_iter()
                    .flatten(),
            )
            .arg("--interfaces")
            .arg(options.interfaces.join(","))
            .arg("--state-dir")
            .arg(options.state_dir)
            .args(options.extra_args)
            .args(
                // Socket hooks only where a test gives them a cgroup of its own: by default they
                // would apply to every process of the host.
                (!options.extra_args.contains(&SOCKET_CGROUP)).then_some(NO_SOCKET_HOOKS),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe. An interrupted test or demo must not leave an agent
        // running: the kernel kills it when the thread that started it exits.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Self {
            child: Some(node.spawn(&mut command)?),
            log: options.log.to_owned(),
        })
    }

    /// Waits until the agent logs that its first sync is programmed.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.log_text().contains(READY_MARKER) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("lb agent exited ({status}):\n{}", self.log_text());
            }
            if Instant::now() >= deadline {
                bail!(
                    "lb agent not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the agent process is still running (it has not exited nor been stopped).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Everything the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the agent at once (SIGKILL), as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the agent gracefully (SIGTERM), killing it if it does not exit in time.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The endpoints `lb services -o json` output (`services_json`) lists for `frontend` and
/// `protocol` (`"TCP"`, `"UDP"`); empty when the maps do not hold the frontend.
pub fn endpoints_in(
    services_json: &str,
    frontend: std::net::SocketAddr,
    protocol: &str,
) -> Vec<String> {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(services_json).expect("lb services JSON");
    rows.iter()
        .find(|row| row["frontend"] == frontend.to_string() && row["protocol"] == protocol)
        .map(|row| {
            row["endpoints"]
                .as_array()
                .expect("endpoints")
                .iter()
                .map(|e| e.as_str().expect("endpoint").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Tears down what a test harness ran: stops `agent` if it runs, then detaches and unpins the
/// dataplane of `pin_dir` (`lb reset`) and removes the scratch directory `workdir`. Errors are
/// ignored: this runs on drop, after a test failed too.
pub fn tear_down(agent: Option<Agent>, lb_path: &Path, pin_dir: &Path, workdir: &Path) {
    if let Some(mut agent) = agent {
        agent.stop();
    }
    let _ = lb(lb_path, pin_dir, &["reset"]);
    let _ = std::fs::remove_dir_all(workdir);
}

/// The agent's health endpoints in its network namespace (its default `--health-address`).
pub const HEALTH_ADDRESS: &str = "127.0.0.1:10256";

/// `GET path` from the agent's health endpoints in `node`: the status code and the body.
pub fn health(node: &Netns, path: &str) -> anyhow::Result<(u16, String)> {
    http_get(node, HEALTH_ADDRESS, path)
}

/// The agent's metrics in its network namespace (its default `--metrics-address`).
pub const METRICS_ADDRESS: &str = "127.0.0.1:10249";

/// `GET path` from `address` in `node` (HTTP/1.0): the status code and the body.
pub fn http_get(node: &Netns, address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = node
        .run(|| std::net::TcpStream::connect(address))?
        .with_context(|| format!("connecting to the agent at {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: lb\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no HTTP status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
