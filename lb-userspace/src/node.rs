//! What the agent knows about the node it runs on: the addresses NodePorts are served on, and
//! the NodePort range. Read from the system here; consumed by the pure desired-state function.

use std::{fmt, net::Ipv4Addr, ops::RangeInclusive, str::FromStr};

use anyhow::{Context as _, bail};
use lb_common::config::{Cidr, DataplaneConfig, MAX_SERVICE_CIDRS};

/// kube-proxy's and the API server's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30_000..=32_767;

/// An IPv4 prefix, as `--nodeport-addresses` takes it (`10.0.0.0/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// Bits in an IPv4 address.
const IPV4_BITS: u8 = 32;

impl Ipv4Cidr {
    fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(u32::from(IPV4_BITS - self.prefix_len))
            .unwrap_or(0)
    }

    /// The same prefix with the host bits cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn network(self) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix_len: self.prefix_len,
        }
    }

    pub fn contains(self, addr: Ipv4Addr) -> bool {
        (u32::from(addr) ^ u32::from(self.addr)) & self.mask() == 0
    }
}

impl FromStr for Ipv4Cidr {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let (addr, prefix_len) = text
            .split_once('/')
            .with_context(|| format!("{text:?}: expected ADDRESS/PREFIX, e.g. 10.0.0.0/8"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("{text:?}: {addr:?} is not an IPv4 address"))?;
        let prefix_len: u8 = prefix_len
            .parse()
            .ok()
            .filter(|len| *len <= IPV4_BITS)
            .with_context(|| format!("{text:?}: the prefix length must be 0 to {IPV4_BITS}"))?;
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The largest service CIDR the API server accepts for IPv4 (`--service-cluster-ip-range`
/// refuses a shorter prefix): a typo such as `10.0.0.0/1` must not make the node drop half the
/// Internet.
pub const MIN_SERVICE_CIDR_PREFIX: u8 = 12;

/// The datapath's node-wide settings from `--service-cidr` and `--reject-rate`.
pub fn dataplane_config(
    service_cidrs: &[Ipv4Cidr],
    rejects_per_second: u32,
) -> anyhow::Result<DataplaneConfig> {
    if service_cidrs.len() > MAX_SERVICE_CIDRS {
        bail!(
            "--service-cidr: {} prefixes given, at most {MAX_SERVICE_CIDRS} are supported",
            service_cidrs.len()
        );
    }
    let mut config = DataplaneConfig {
        rejects_per_second,
        service_cidr_count: service_cidrs.len() as u32,
        netns_cookie: netns_cookie()?,
        ..DataplaneConfig::default()
    };
    for (slot, cidr) in config.service_cidrs.iter_mut().zip(service_cidrs) {
        if cidr.prefix_len < MIN_SERVICE_CIDR_PREFIX {
            bail!(
                "--service-cidr {cidr}: too large; the API server allows /{MIN_SERVICE_CIDR_PREFIX} \
                 or longer"
            );
        }
        *slot = Cidr {
            addr: u32::from(cidr.addr).to_be() & cidr.mask().to_be(),
            mask: cidr.mask().to_be(),
        };
    }
    Ok(config)
}

/// The cookie of the calling thread's network namespace (Linux 5.14+), which the socket hooks
/// compare a socket's with.
pub fn netns_cookie() -> anyhow::Result<u64> {
    let socket = std::net::UdpSocket::bind(("127.0.0.1", 0))
        .context("opening a socket to read the network namespace's cookie")?;
    let mut cookie: u64 = 0;
    let mut length = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a u64 of the size given, which the kernel fills.
    let result = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (needs Linux 5.14)");
    }
    Ok(cookie)
}

/// Parses `--service-node-port-range` (`30000-32767`).
pub fn parse_port_range(text: &str) -> anyhow::Result<RangeInclusive<u16>> {
    let (low, high) = text
        .split_once('-')
        .with_context(|| format!("{text:?}: expected LOW-HIGH, e.g. 30000-32767"))?;
    let parse = |port: &str| -> anyhow::Result<u16> {
        port.trim()
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0)
            .with_context(|| format!("{text:?}: {port:?} is not a port (1 to 65535)"))
    };
    let (low, high) = (parse(low)?, parse(high)?);
    if low > high {
        bail!("{text:?}: the range is empty ({low} is above {high})");
    }
    Ok(low..=high)
}

/// What the desired state needs to know about the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The addresses NodePorts are served on.
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// The range nodePorts come from; a nodePort outside it is not programmed.
    pub node_port_range: RangeInclusive<u16>,
    /// This node's name, as EndpointSlices name it in `endpoints[].nodeName`: which endpoints
    /// are local for the `Local` traffic policies. `None`: every endpoint counts as local.
    pub node_name: Option<String>,
    /// This node's `topology.kubernetes.io/zone` label (from its Node object), for the zone
    /// hints of topology-aware routing. `None`: zone hints are not used, as kube-proxy does on a
    /// node without the label.
    pub zone: Option<String>,
    /// This node's IPv4 InternalIP addresses in its Node object (`status.addresses`), for
    /// `--nodeport-addresses primary`; empty when unknown. Not used by the desired state itself.
    pub node_ips: Vec<Ipv4Addr>,
}

/// `--nodeport-addresses`: which of the node's addresses serve NodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node but loopback (kube-proxy's default in iptables mode).
    #[default]
    All,
    /// The node's addresses inside these prefixes.
    Within(Vec<Ipv4Cidr>),
    /// The node's primary addresses: the InternalIPs of its Node object that it holds
    /// (kube-proxy's `primary`, its default in nftables mode). Needs the Kubernetes source.
    Primary,
}

impl FromStr for NodePortAddresses {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        match text.trim() {
            "" => return Ok(Self::All),
            "primary" => return Ok(Self::Primary),
            _ => {}
        }
        let cidrs = text
            .split(',')
            .map(|item| item.trim().parse::<Ipv4Cidr>())
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(if cidrs.is_empty() {
            Self::All
        } else {
            Self::Within(cidrs)
        })
    }
}

impl Default for NodeConfig {
    /// No NodePort addresses: what a test of ClusterIP semantics alone wants.
    fn default() -> Self {
        Self {
            nodeport_addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            node_name: None,
            zone: None,
            node_ips: Vec::new(),
        }
    }
}

/// The file in the agent's state directory holding its [`NodeSettings`].
pub const NODE_SETTINGS_FILE: &str = "node.json";

/// Where the agent's objects come from, as recorded in [`NodeSettings`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceSetting {
    /// `--manifests DIR` (made absolute).
    Manifests(std::path::PathBuf),
    /// The Kubernetes API: `--kubeconfig`, or the in-cluster configuration when `None`.
    Kubernetes {
        kubeconfig: Option<std::path::PathBuf>,
    },
}

/// What the agent computes the desired state with, besides the objects: its source and the
/// [`NodeConfig`] in effect (the NodePort addresses it found on the node, the range, its name,
/// its Node's zone). The agent writes it to its state directory ([`NODE_SETTINGS_FILE`]) at
/// start and whenever it changes, so that `lb plan` computes the desired state as the agent
/// does, from anywhere (another network namespace has other addresses) and while the agent is
/// down.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSettings {
    pub source: SourceSetting,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// `--service-node-port-range`, `LOW-HIGH`.
    pub node_port_range: String,
    pub node_ips: Vec<Ipv4Addr>,
}

impl NodeSettings {
    /// The settings of an agent reading `source` on the node `node` describes.
    pub fn new(source: SourceSetting, node: &NodeConfig) -> Self {
        Self {
            source,
            node_name: node.node_name.clone(),
            zone: node.zone.clone(),
            nodeport_addresses: node.nodeport_addresses.clone(),
            node_port_range: format!(
                "{}-{}",
                node.node_port_range.start(),
                node.node_port_range.end()
            ),
            node_ips: node.node_ips.clone(),
        }
    }

    /// The node as the desired state sees it.
    pub fn node(&self) -> anyhow::Result<NodeConfig> {
        Ok(NodeConfig {
            nodeport_addresses: self.nodeport_addresses.clone(),
            node_port_range: parse_port_range(&self.node_port_range)?,
            node_name: self.node_name.clone(),
            zone: self.zone.clone(),
            node_ips: self.node_ips.clone(),
        })
    }

    /// Reads the settings an agent left in `state_dir`; `None` when it left none.
    pub fn load(state_dir: &std::path::Path) -> anyhow::Result<Option<Self>> {
        let path = state_dir.join(NODE_SETTINGS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(json) => Ok(Some(serde_json::from_str(&json).with_context(|| {
                format!("reading the node settings {}", path.display())
            })?)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the settings to `state_dir` atomically (a reader never sees half a file).
    pub fn save(&self, state_dir: &std::path::Path) -> anyhow::Result<()> {
        let path = state_dir.join(NODE_SETTINGS_FILE);
        let temporary = path.with_extension("json.tmp");
        std::fs::write(&temporary, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("renaming {} into place", temporary.display()))?;
        Ok(())
    }
}

/// The host name (`uname -n`): the node's name unless told otherwise, as with kube-proxy.
pub fn host_name() -> anyhow::Result<String> {
    let mut name = std::mem::MaybeUninit::<libc::utsname>::zeroed();
    // SAFETY: uname fills the struct it is given.
    if unsafe { libc::uname(name.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the host name");
    }
    // SAFETY: filled by uname above.
    let name = unsafe { name.assume_init() };
    let bytes: Vec<u8> = name
        .nodename
        .iter()
        .take_while(|byte| **byte != 0)
        .map(|byte| byte.to_ne_bytes()[0])
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The IPv4 addresses of this network namespace's interfaces, loopback excluded (XDP never sees
/// traffic to it), in the order the kernel lists them, without duplicates.
pub fn local_addresses() -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing the node's addresses");
    }
    let mut addresses = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let current = unsafe { &*entry };
        if !current.ifa_addr.is_null()
            // SAFETY: a non-null ifa_addr points at a sockaddr.
            && i32::from(unsafe { (*current.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in.
            let sin = unsafe { &*current.ifa_addr.cast::<libc::sockaddr_in>() };
            let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !addr.is_loopback() && !addresses.contains(&addr) {
                addresses.push(addr);
            }
        }
        entry = current.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}

/// The addresses NodePorts are served on: every local address, or those inside `allowed` when
/// `--nodeport-addresses` is given.
pub fn nodeport_addresses(local: &[Ipv4Addr], allowed: &[Ipv4Cidr]) -> Vec<Ipv4Addr> {
    local
        .iter()
        .copied()
        .filter(|addr| allowed.is_empty() || allowed.iter().any(|cidr| cidr.contains(*addr)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_addresses_are_every_address_prefixes_or_the_primary_ones() {
        let parse = |text: &str| text.parse::<NodePortAddresses>();
        assert_eq!(parse("").unwrap(), NodePortAddresses::All);
        assert_eq!(parse("primary").unwrap(), NodePortAddresses::Primary);
        assert_eq!(
            parse("10.0.0.0/8, 192.168.1.0/24").unwrap(),
            NodePortAddresses::Within(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap()
            ])
        );
        assert!(parse("primary,10.0.0.0/8").is_err());
        assert!(parse("10.0.0.0/33").is_err());
    }

    #[test]
    fn service_cidrs_become_wire_prefixes_within_the_api_server_s_limits() {
        let cidrs: Vec<Ipv4Cidr> = ["10.96.0.0/12", "172.20.1.0/24"]
            .iter()
            .map(|text| text.parse().expect("valid"))
            .collect();
        let config = dataplane_config(&cidrs, 7).expect("valid");
        assert_eq!(config.service_cidr_count, 2);
        assert_eq!(config.rejects_per_second, 7);
        let wire = |text: &str| u32::from_ne_bytes(text.parse::<Ipv4Addr>().unwrap().octets());
        assert!(config.in_service_cidr(wire("10.96.0.10")));
        assert!(config.in_service_cidr(wire("10.111.255.255")));
        assert!(!config.in_service_cidr(wire("10.112.0.0")));
        assert!(config.in_service_cidr(wire("172.20.1.200")));
        assert!(!config.in_service_cidr(wire("172.20.2.1")));
        // Host bits given by mistake are cleared, as the prefix means.
        let sloppy = dataplane_config(&["10.96.3.4/12".parse().unwrap()], 0).unwrap();
        assert!(sloppy.in_service_cidr(wire("10.96.0.1")));
        // Unused slots match nothing.
        assert!(!dataplane_config(&[], 0).unwrap().in_service_cidr(0));

        let too_large = dataplane_config(&["10.0.0.0/11".parse().unwrap()], 0).unwrap_err();
        assert!(
            format!("{too_large}").contains("/12 or longer"),
            "{too_large}"
        );
        let too_many = vec![cidrs[0]; MAX_SERVICE_CIDRS + 1];
        assert!(dataplane_config(&too_many, 0).is_err());
    }

    #[test]
    fn cidrs_parse_and_match() {
        let cidr: Ipv4Cidr = "10.0.0.0/24".parse().expect("valid");
        assert!(cidr.contains(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 0, 1, 1)));
        let everything: Ipv4Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(everything.contains(Ipv4Addr::new(192, 0, 2, 1)));
        let host: Ipv4Cidr = "192.0.2.7/32".parse().expect("valid");
        assert!(host.contains(Ipv4Addr::new(192, 0, 2, 7)));
        assert!(!host.contains(Ipv4Addr::new(192, 0, 2, 6)));
        assert_eq!(host.to_string(), "192.0.2.7/32");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "::1/128",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(
            parse_port_range("30000-32767").expect("valid"),
            30_000..=32_767
        );
        assert_eq!(parse_port_range("80-80").expect("valid"), 80..=80);
        for bad in ["30000", "0-10", "10-5", "1-65536", "a-b"] {
            assert!(parse_port_range(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn nodeport_addresses_are_filtered_by_the_allowed_prefixes() {
        let local = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 1, 1, 254)];
        assert_eq!(nodeport_addresses(&local, &[]), local.to_vec());
        let allowed = ["10.0.0.0/24".parse().expect("valid")];
        assert_eq!(
            nodeport_addresses(&local, &allowed),
            vec![Ipv4Addr::new(10, 0, 0, 1)]
        );
    }

    #[test]
    fn node_settings_survive_the_file_and_give_the_node_back() {
        let node = NodeConfig {
            nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
            node_port_range: 30_000..=30_100,
            node_name: Some("node-a".to_owned()),
            zone: Some("zone-1".to_owned()),
            node_ips: vec![Ipv4Addr::new(10, 0, 0, 1)],
        };
        let settings = NodeSettings::new(SourceSetting::Manifests("/etc/lb".into()), &node);
        let dir = std::env::temp_dir().join(format!("lb-node-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        assert_eq!(NodeSettings::load(&dir).expect("no file is fine"), None);
        settings.save(&dir).expect("save");
        let loaded = NodeSettings::load(&dir).expect("load").expect("saved");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(loaded, settings);
        assert_eq!(loaded.node().expect("valid range"), node);
    }

    #[test]
    fn local_addresses_leave_out_loopback() {
        let addresses = local_addresses().expect("getifaddrs");
        assert!(addresses.iter().all(|addr| !addr.is_loopback()));
    }
}
