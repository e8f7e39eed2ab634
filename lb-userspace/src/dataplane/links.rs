//! Which interfaces the XDP program runs on: the `--interfaces` patterns (names and globs such as
//! `veth*`) matched against the links of the node's network namespace at start-up, then kept
//! matched while links come, go and get renamed (pods' veths), through rtnetlink notifications.
//!
//! Notifications are a hint, not the truth: the kernel drops them when the socket's buffer is
//! full, and one may describe a link that is gone by the time it is read. So the follower keeps
//! its own picture of the namespace's links, updated by each notification and replaced by a full
//! dump when notifications were lost and every [`RESCAN_INTERVAL`], and derives what to attach,
//! detach and rename by comparing that picture with what it pinned ([`plan`]). An attach asks
//! the kernel about the interface first.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::AsRawFd as _,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use lb_common::limits::LINKS_SUBDIR;
use rtnetlink::{
    MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
    },
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::{
    task::JoinHandle,
    time::{Instant, interval_at, timeout},
};
use tracing::{debug, info, warn};

use crate::dataplane::{Dataplane, VethRedirect, system, unpin_link};

/// A full re-read of the links even when no notification says anything was lost: the safety net
/// under notifications, which are best effort.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// How long a dump of the links may take; the kernel answers at once, so this only bounds a
/// netlink socket that stopped answering.
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer of the notification socket, for bursts of pods starting at once (a link
/// notification is 1 to 2 KiB). Notifications beyond it are lost and the links read again.
const NOTIFICATION_BUFFER_BYTES: libc::c_int = 4 << 20;
/// How long to wait before subscribing again after the notification socket failed, so that a
/// socket failing at once does not spin.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);
/// Characters that make an item of `--interfaces` a glob. Linux would take them in an interface
/// name, but no tool makes such names.
const GLOB_CHARACTERS: [char; 3] = ['*', '?', '['];

/// One item of `--interfaces`.
#[derive(Clone, Debug)]
pub enum Pattern {
    /// An interface's name: it must exist at start-up, so that a typo stops the agent instead of
    /// leaving an interface without the program.
    Name(String),
    /// A glob such as `veth*`: whatever matches, at start-up or later; possibly nothing yet.
    Glob(glob::Pattern),
}

impl Pattern {
    /// An item of `--interfaces`: a glob if it holds `*`, `?` or `[`, else a name.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if text.is_empty() {
            bail!("an empty interface name in --interfaces (a stray comma?)");
        }
        if text.contains(GLOB_CHARACTERS) {
            let glob = glob::Pattern::new(text)
                .with_context(|| format!("--interfaces {text}: not a glob (`*`, `?`, `[...]`)"))?;
            Ok(Self::Glob(glob))
        } else {
            Ok(Self::Name(text.to_owned()))
        }
    }

    fn matches(&self, link: &Link) -> bool {
        match self {
            Self::Name(name) => *name == link.name,
            // XDP on loopback serves no Service traffic: packets there were made by the node
            // itself, whose own connections to Services the socket hooks translate. A glob as
            // wide as `*` must not put the program there; naming `lo` still does.
            Self::Glob(glob) => !link.loopback && glob.matches(&link.name),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Glob(glob) => f.write_str(glob.as_str()),
        }
    }
}

/// The `--interfaces` patterns.
#[derive(Clone, Debug)]
pub struct Patterns(Vec<Pattern>);

impl Patterns {
    /// The items of `--interfaces`; fails on an empty list or an item that is no valid glob.
    pub fn parse(items: &[String]) -> anyhow::Result<Self> {
        if items.is_empty() {
            bail!(
                "no interfaces given: pass --interfaces with the node's interfaces, e.g. eth0 or \
                 eth0,veth*"
            );
        }
        let mut seen = BTreeSet::new();
        items
            .iter()
            .filter(|item| seen.insert(item.as_str()))
            .map(|item| Pattern::parse(item))
            .collect::<anyhow::Result<_>>()
            .map(Self)
    }

    /// The interfaces named exactly, which must exist at start-up.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|pattern| match pattern {
            Pattern::Name(name) => Some(name.as_str()),
            Pattern::Glob(_) => None,
        })
    }

    fn globs(&self) -> impl Iterator<Item = &Pattern> {
        self.0
            .iter()
            .filter(|pattern| matches!(pattern, Pattern::Glob(_)))
    }

    /// Whether the program belongs on `link`.
    pub fn matches(&self, link: &Link) -> bool {
        self.0.iter().any(|pattern| pattern.matches(link))
    }
}

/// A link of the network namespace, as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub loopback: bool,
}

/// The namespace's links by interface index.
type Links = BTreeMap<u32, Link>;

/// What it takes to bring the pinned links in line with the namespace's links.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// Attach to the interface `ifindex`, named `name`.
    Attach { name: String, ifindex: u32 },
    /// Unpin the link pinned as `name` for the interface `ifindex`, which is gone (`now` is
    /// `None`) or was renamed `now` and is no longer matched under that name.
    Detach {
        name: String,
        ifindex: u32,
        now: Option<String>,
    },
    /// The interface `ifindex` was renamed from `from` to `to` and is still matched: its pin
    /// moves, the program stays attached.
    Rename {
        from: String,
        to: String,
        ifindex: u32,
    },
}

/// The actions that make `attached` (pinned names and their interfaces' indexes) follow `links`:
/// detaches and renames first, so that an attach never meets a stale pin of its name. Attaches
/// that failed for the same interface (`failed`) are left for the next full re-read.
fn plan(
    links: &Links,
    attached: &BTreeMap<String, u32>,
    failed: &BTreeMap<String, u32>,
    patterns: &Patterns,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut pinned = BTreeSet::new();
    for (name, &ifindex) in attached {
        match links.get(&ifindex) {
            Some(link) if link.name == *name && patterns.matches(link) => {
                pinned.insert(name.as_str());
            }
            Some(link)
                if link.name != *name
                    && patterns.matches(link)
                    && !attached.contains_key(&link.name) =>
            {
                pinned.insert(link.name.as_str());
                actions.push(Action::Rename {
                    from: name.clone(),
                    to: link.name.clone(),
                    ifindex,
                });
            }
            // Renamed to a name not matched, or to one still pinned for another interface (two
            // interfaces swapping names): detached, and attached afresh below if matched.
            Some(link) => actions.push(Action::Detach {
                name: name.clone(),
                ifindex,
                now: Some(link.name.clone()),
            }),
            // Gone, or deleted and re-created under the same name with another index.
            None => actions.push(Action::Detach {
                name: name.clone(),
                ifindex,
                now: None,
            }),
        }
    }
    for (&ifindex, link) in links {
        if patterns.matches(link)
            && !pinned.contains(link.name.as_str())
            && failed.get(&link.name) != Some(&ifindex)
        {
            actions.push(Action::Attach {
                name: link.name.clone(),
                ifindex,
            });
        }
    }
    actions
}

fn link_of(message: &LinkMessage) -> Option<(u32, Link)> {
    let name = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
    let loopback = message.header.flags.contains(LinkFlags::Loopback);
    Some((message.header.index, Link { name, loopback }))
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every link of this network namespace (rtnetlink dump).
async fn dump_links() -> anyhow::Result<Links> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let _connection = AbortOnDrop(tokio::spawn(connection));
    let dump = async {
        let mut links = Links::new();
        let mut messages = std::pin::pin!(handle.link().get().execute());
        while let Some(message) = messages.try_next().await? {
            if let Some((ifindex, link)) = link_of(&message) {
                links.insert(ifindex, link);
            }
        }
        anyhow::Ok(links)
    };
    timeout(DUMP_TIMEOUT, dump)
        .await
        .context("rtnetlink did not answer")?
        .context("listing the links (rtnetlink)")
}

/// What a notification says.
enum Notice {
    Link(u32, Link),
    Gone(u32),
    /// The kernel dropped notifications (the socket's buffer was full).
    Lost,
    /// The notification socket failed: no more notifications come through it.
    Closed,
    Other,
}

/// A subscription to link notifications (`RTNLGRP_LINK`).
struct Subscription {
    _connection: AbortOnDrop,
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl Subscription {
    fn open() -> anyhow::Result<Self> {
        let (mut connection, _, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .context("subscribing to link notifications (rtnetlink)")?;
        let socket = connection.socket_mut().socket_ref();
        // SO_RCVBUFFORCE: the agent has CAP_NET_ADMIN, and net.core.rmem_max would cap the
        // plain option far below a burst of pods.
        // SAFETY: a valid socket and an int option the size given.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&NOTIFICATION_BUFFER_BYTES as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            debug!(
                error = %io::Error::last_os_error(),
                "keeping the default notification buffer; bursts may overrun it (then the \
                 links are read again)"
            );
        }
        Ok(Self {
            _connection: AbortOnDrop(tokio::spawn(connection)),
            messages,
        })
    }

    async fn next(&mut self) -> Notice {
        let Some((message, _)) = self.messages.next().await else {
            return Notice::Closed;
        };
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                link_of(&link).map_or(Notice::Other, |(ifindex, link)| Notice::Link(ifindex, link))
            }
            // A bridge port leaving its bridge is a DELLINK of the bridge family; the interface
            // itself stays.
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                if link.header.interface_family == AddressFamily::Unspec =>
            {
                Notice::Gone(link.header.index)
            }
            NetlinkPayload::Overrun(_) => Notice::Lost,
            _ => Notice::Other,
        }
    }
}

/// Sets `net.ipv4.conf.<interface>.accept_local` (see [`system::accept_local`]), saying so when
/// it changed it.
pub fn allow_local_sources(interface: &str) -> anyhow::Result<()> {
    if system::accept_local(interface)? {
        info!(
            "set net.ipv4.conf.{interface}.accept_local=1: NodePort replies carry the node's \
             address as source when the kernel routes them"
        );
    }
    Ok(())
}

/// The interfaces the program is attached to, kept matching `--interfaces`.
pub struct Interfaces {
    patterns: Patterns,
    veth_redirect: VethRedirect,
    subscription: Option<Subscription>,
    /// The namespace's links as last heard of.
    links: Links,
    /// The links this agent pinned, by name, with their interface's index.
    attached: BTreeMap<String, u32>,
    /// Interfaces whose attach failed, with the index it failed for; retried at the next full
    /// re-read rather than at every notification.
    failed: BTreeMap<String, u32>,
    /// Whether an attach also sets the interface's sysctls and warns about them; at start-up the
    /// agent does it for every interface at once, with the node-wide checks.
    set_sysctls: bool,
}

impl Interfaces {
    /// Attaches the program to every interface `patterns` match now and detaches it from the
    /// interfaces an earlier agent attached that they no longer match. An interface named
    /// exactly that fails to attach fails the start; one matched by a glob is only warned about.
    /// Subscribes to link notifications first, so that a link appearing meanwhile is either in
    /// the dump or notified to [`Interfaces::follow`].
    pub async fn attach(
        dataplane: &mut Dataplane,
        patterns: Patterns,
        veth_redirect: VethRedirect,
    ) -> anyhow::Result<Self> {
        let subscription = Subscription::open()?;
        let links = dump_links().await?;
        for glob in patterns.globs() {
            if !links.values().any(|link| glob.matches(link)) {
                info!("--interfaces {glob}: no interface matches yet; attaching as they appear");
            }
        }
        let names: Vec<String> = patterns.names().map(str::to_owned).collect();
        let wanted: Vec<String> = links
            .values()
            .filter(|link| patterns.matches(link))
            .map(|link| link.name.clone())
            .chain(names.iter().cloned())
            .collect();
        // Before any attach: a link pinned for an interface renamed while no agent ran still
        // holds that interface, and would refuse a fresh attach under its new name.
        dataplane.detach_others(&wanted)?;
        let mut interfaces = Self {
            patterns,
            veth_redirect,
            subscription: Some(subscription),
            links,
            attached: BTreeMap::new(),
            failed: BTreeMap::new(),
            set_sysctls: false,
        };
        for name in names {
            let ifindex = dataplane.attach(&name, veth_redirect)?;
            interfaces.attached.insert(name, ifindex);
        }
        interfaces.sync(dataplane);
        Ok(interfaces)
    }

    /// The interfaces the program is attached to.
    pub fn attached(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    /// Keeps following link notifications in a task that owns `dataplane`, until the returned
    /// guard is dropped. Each attach, detach and rename happens between two awaits, so
    /// stopping never leaves one half done.
    pub fn follow(mut self, dataplane: Dataplane) -> Following {
        self.set_sysctls = true;
        Following {
            _task: AbortOnDrop(tokio::spawn(self.run(dataplane))),
        }
    }

    async fn run(mut self, mut dataplane: Dataplane) {
        let mut rescan = interval_at(Instant::now() + RESCAN_INTERVAL, RESCAN_INTERVAL);
        loop {
            let notice = tokio::select! {
                notice = async {
                    match self.subscription.as_mut() {
                        Some(subscription) => subscription.next().await,
                        None => std::future::pending().await,
                    }
                } => notice,
                _ = rescan.tick() => {
                    // Attaches that failed get another chance, and a lost subscription another
                    // try.
                    self.failed.clear();
                    self.rescan().await;
                    self.sync(&mut dataplane);
                    continue;
                }
            };
            match notice {
                Notice::Link(ifindex, link) => {
                    self.links.insert(ifindex, link);
                }
                Notice::Gone(ifindex) => {
                    self.links.remove(&ifindex);
                }
                Notice::Lost => {
                    warn!("link notifications were lost (buffer overrun); reading the links again");
                    self.rescan().await;
                }
                Notice::Closed => {
                    warn!("the link notifications stopped; subscribing again");
                    self.subscription = None;
                    tokio::time::sleep(RESUBSCRIBE_DELAY).await;
                    self.rescan().await;
                }
                Notice::Other => continue,
            }
            self.sync(&mut dataplane);
        }
    }

    /// Replaces the picture of the links with a dump, subscribing again first if needed (so that
    /// nothing falls between the dump and the notifications).
    async fn rescan(&mut self) {
        if self.subscription.is_none() {
            match Subscription::open() {
                Ok(subscription) => self.subscription = Some(subscription),
                Err(error) => warn!(
                    "{error:#}; interfaces are followed by reading them every {}s until it works",
                    RESCAN_INTERVAL.as_secs()
                ),
            }
        }
        match dump_links().await {
            Ok(links) => self.links = links,
            Err(error) => warn!(
                "{error:#}; keeping the interfaces as they were, trying again in {}s",
                RESCAN_INTERVAL.as_secs()
            ),
        }
    }

    /// Brings the pinned links in line with the picture of the links.
    fn sync(&mut self, dataplane: &mut Dataplane) {
        for action in plan(&self.links, &self.attached, &self.failed, &self.patterns) {
            match action {
                Action::Attach { name, ifindex } => self.attach_one(dataplane, name, ifindex),
                Action::Detach { name, ifindex, now } => {
                    self.attached.remove(&name);
                    if let Err(error) = unpin(&dataplane.pin_dir, &name, ifindex) {
                        warn!(interface = name, "detaching the XDP program: {error:#}");
                        continue;
                    }
                    match now {
                        None => info!(
                            interface = name,
                            ifindex, "interface gone: XDP link unpinned"
                        ),
                        Some(now) => info!(
                            interface = name,
                            ifindex, "interface renamed {now}: XDP program detached"
                        ),
                    }
                }
                Action::Rename { from, to, ifindex } => {
                    self.attached.remove(&from);
                    let links_dir = dataplane.pin_dir.join(LINKS_SUBDIR);
                    match fs::rename(links_dir.join(&from), links_dir.join(&to)) {
                        Ok(()) => {
                            info!(
                                interface = to,
                                from, ifindex, "interface renamed: its XDP link follows"
                            );
                            self.attached.insert(to, ifindex);
                        }
                        Err(error) => {
                            warn!(
                                interface = to,
                                from, "moving the pinned XDP link: {error}; attaching afresh"
                            );
                            match unpin(&dataplane.pin_dir, &from, ifindex) {
                                Ok(()) => self.attach_one(dataplane, to, ifindex),
                                Err(error) => {
                                    warn!(interface = from, "detaching the XDP program: {error:#}")
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn attach_one(&mut self, dataplane: &mut Dataplane, name: String, ifindex: u32) {
        // A notification read late may describe a link deleted or renamed since; the
        // notifications that followed it will say what became of it.
        if system::interface_index(&name).ok() != Some(ifindex) {
            debug!(interface = name, ifindex, "no longer there; not attaching");
            self.links.remove(&ifindex);
            return;
        }
        match dataplane.attach(&name, self.veth_redirect) {
            Ok(ifindex) => {
                self.failed.remove(&name);
                if self.set_sysctls {
                    if let Err(error) = allow_local_sources(&name) {
                        warn!(interface = name, "{error:#}");
                    }
                    if let Some(warning) = system::rp_filter_warning(&name) {
                        warn!("{warning}");
                    }
                }
                self.attached.insert(name, ifindex);
            }
            Err(error) => {
                warn!(
                    interface = name,
                    "{error:#}; trying again in {}s",
                    RESCAN_INTERVAL.as_secs()
                );
                self.failed.insert(name, ifindex);
            }
        }
    }
}

/// [`unpin_link`], where a pin already gone is fine: `lb reset` or a person removed it.
fn unpin(pin_dir: &Path, name: &str, ifindex: u32) -> anyhow::Result<()> {
    match unpin_link(pin_dir, name, Some(ifindex)) {
        Err(error)
            if error
                .downcast_ref::<io::Error>()
                .is_some_and(|error| error.kind() == io::ErrorKind::NotFound) =>
        {
            Ok(())
        }
        result => result,
    }
}

/// The task following link notifications; stopped when dropped.
pub struct Following {
    _task: AbortOnDrop,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(items: &[&str]) -> Patterns {
        Patterns::parse(
            &items
                .iter()
                .map(|item| (*item).to_owned())
                .collect::<Vec<_>>(),
        )
        .expect("valid patterns")
    }

    fn link(name: &str) -> Link {
        Link {
            name: name.to_owned(),
            loopback: false,
        }
    }

    fn links(entries: &[(u32, &str)]) -> Links {
        entries
            .iter()
            .map(|(ifindex, name)| (*ifindex, link(name)))
            .collect()
    }

    fn attached(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries
            .iter()
            .map(|(name, ifindex)| ((*name).to_owned(), *ifindex))
            .collect()
    }

    fn attach(name: &str, ifindex: u32) -> Action {
        Action::Attach {
            name: name.to_owned(),
            ifindex,
        }
    }

    fn detach(name: &str, ifindex: u32, now: Option<&str>) -> Action {
        Action::Detach {
            name: name.to_owned(),
            ifindex,
            now: now.map(str::to_owned),
        }
    }

    #[test]
    fn names_match_exactly_and_globs_match_like_a_shell() {
        let patterns = patterns(&["eth0", "veth*", "lxc?", "cali[0-9]*"]);
        for name in ["eth0", "veth", "veth1a2b", "lxcA", "cali7x"] {
            assert!(patterns.matches(&link(name)), "{name}");
        }
        for name in ["eth01", "eth", "xveth1", "lxc", "lxc12", "calix", "Veth1"] {
            assert!(!patterns.matches(&link(name)), "{name}");
        }
        assert_eq!(patterns.names().collect::<Vec<_>>(), ["eth0"]);
    }

    #[test]
    fn loopback_is_never_matched_by_a_glob_only_by_its_name() {
        let loopback = Link {
            name: "lo".to_owned(),
            loopback: true,
        };
        for glob in ["*", "l*", "lo*", "?o", "[l]o"] {
            assert!(!patterns(&[glob]).matches(&loopback), "{glob}");
        }
        assert!(patterns(&["lo"]).matches(&loopback));
        // The flag decides, not the name: a renamed loopback is still loopback.
        let renamed = Link {
            name: "lb0".to_owned(),
            loopback: true,
        };
        assert!(!patterns(&["lb*"]).matches(&renamed));
    }

    #[test]
    fn bad_items_are_refused() {
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("veth[0-9").is_err());
        assert!(Patterns::parse(&[]).is_err());
        assert!(matches!(Pattern::parse("eth0"), Ok(Pattern::Name(_))));
        assert!(matches!(Pattern::parse("eth[01]"), Ok(Pattern::Glob(_))));
    }

    #[test]
    fn repeated_items_count_once() {
        assert_eq!(patterns(&["eth0", "eth0"]).names().count(), 1);
    }

    #[test]
    fn matching_links_are_attached_others_left_alone() {
        let patterns = patterns(&["eth0", "veth*"]);
        let now = links(&[(1, "lo"), (2, "eth0"), (3, "veth1"), (4, "docker0")]);
        assert_eq!(
            plan(&now, &attached(&[]), &BTreeMap::new(), &patterns),
            [attach("eth0", 2), attach("veth1", 3)]
        );
        assert!(
            plan(
                &now,
                &attached(&[("eth0", 2), ("veth1", 3)]),
                &BTreeMap::new(),
                &patterns
            )
            .is_empty()
        );
    }

    #[test]
    fn a_deleted_interface_is_detached() {
        let patterns = patterns(&["veth*"]);
        assert_eq!(
            plan(
                &links(&[(3, "veth1")]),
                &attached(&[("veth1", 3), ("veth2", 4)]),
                &BTreeMap::new(),
                &patterns
            ),
            [detach("veth2", 4, None)]
        );
    }

    #[test]
    fn an_interface_re_created_under_its_name_is_detached_then_attached_afresh() {
        // Its deletion went unnoticed (lost notifications): the stale pin goes first.
        assert_eq!(
            plan(
                &links(&[(9, "veth1")]),
                &attached(&[("veth1", 3)]),
                &BTreeMap::new(),
                &patterns(&["veth*"])
            ),
            [detach("veth1", 3, None), attach("veth1", 9)]
        );
    }

    #[test]
    fn renames_move_the_pin_or_detach() {
        let patterns = patterns(&["veth*"]);
        let none = BTreeMap::new();
        assert_eq!(
            plan(
                &links(&[(3, "veth9")]),
                &attached(&[("veth1", 3)]),
                &none,
                &patterns
            ),
            [Action::Rename {
                from: "veth1".to_owned(),
                to: "veth9".to_owned(),
                ifindex: 3
            }]
        );
        assert_eq!(
            plan(
                &links(&[(3, "eth9")]),
                &attached(&[("veth1", 3)]),
                &none,
                &patterns
            ),
            [detach("veth1", 3, Some("eth9"))]
        );
        assert_eq!(
            plan(&links(&[(3, "veth1")]), &attached(&[]), &none, &patterns),
            [attach("veth1", 3)]
        );
        // Two interfaces swapping names: neither pin can move first; both start over.
        assert_eq!(
            plan(
                &links(&[(3, "veth2"), (4, "veth1")]),
                &attached(&[("veth1", 3), ("veth2", 4)]),
                &none,
                &patterns
            ),
            [
                detach("veth1", 3, Some("veth2")),
                detach("veth2", 4, Some("veth1")),
                attach("veth2", 3),
                attach("veth1", 4)
            ]
        );
    }

    #[test]
    fn a_failed_attach_waits_unless_the_interface_changed() {
        let patterns = patterns(&["veth*"]);
        let failed = attached(&[("veth1", 3)]);
        assert!(plan(&links(&[(3, "veth1")]), &attached(&[]), &failed, &patterns).is_empty());
        assert_eq!(
            plan(&links(&[(5, "veth1")]), &attached(&[]), &failed, &patterns),
            [attach("veth1", 5)]
        );
    }
}
