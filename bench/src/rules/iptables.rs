//! kube-proxy's iptables mode: the `nat` table it writes with `iptables-restore`.
//!
//! Every packet that opens a connection walks `KUBE-SERVICES` rule by rule until its (ClusterIP,
//! port) matches, jumps to the Service's `KUBE-SVC-` chain, which picks an endpoint with a chain
//! of `statistic` matches, and the endpoint's `KUBE-SEP-` chain DNATs it. The walk is linear in
//! the number of Service ports, which is the cost this layout is measured for.

use std::{net::Ipv4Addr, time::Duration};

use lb_tests::netns::Netns;

use super::{CLUSTER_CIDR, MASQUERADE_MARK, chain_hash, push_line, run_with_stdin};
use crate::workload::SyntheticService;

/// The loader, legacy on purpose: the project's load-time figures for this layout (10,000
/// Services in 1.3-2 s on the 6.18 development kernel) are measured with it, and the legacy
/// x_tables backend is the one whose rule-by-rule walk the iptables mode is known for;
/// `iptables-nft` would translate the rules into nftables and measure a third layout.
pub const RESTORE: &str = "iptables-legacy-restore";
/// The command line tool of the same backend.
const COMMAND: &str = "iptables-legacy";

/// Where kube-proxy dispatches Service traffic, one rule per Service port.
const SERVICES_CHAIN: &str = "KUBE-SERVICES";
/// NodePorts, jumped to last from `KUBE-SERVICES`; empty here (no NodePort Services).
const NODEPORTS_CHAIN: &str = "KUBE-NODEPORTS";
/// Masquerades the packets `KUBE-MARK-MASQ` marked.
const POSTROUTING_CHAIN: &str = "KUBE-POSTROUTING";
/// Marks a packet for masquerading.
const MARK_MASQ_CHAIN: &str = "KUBE-MARK-MASQ";
/// The chains kube-proxy declares and rewrites in full on every sync, partial or not.
const TOP_LEVEL_CHAINS: [&str; 4] = [
    SERVICES_CHAIN,
    NODEPORTS_CHAIN,
    POSTROUTING_CHAIN,
    MARK_MASQ_CHAIN,
];
/// The `nat` table's built-in chains, declared so that a full restore replaces the whole table.
const BUILTIN_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];
/// The jumps kube-proxy installs from the built-in chains (with `iptables -I`, done here in the
/// same restore): (built-in chain, comment, target).
const HOOKS: [(&str, &str, &str); 3] = [
    ("PREROUTING", "kubernetes service portals", SERVICES_CHAIN),
    ("OUTPUT", "kubernetes service portals", SERVICES_CHAIN),
    (
        "POSTROUTING",
        "kubernetes postrouting rules",
        POSTROUTING_CHAIN,
    ),
];
const SERVICE_CHAIN_PREFIX: &str = "KUBE-SVC-";
const ENDPOINT_CHAIN_PREFIX: &str = "KUBE-SEP-";
/// Hash characters in a chain name, as kube-proxy: `KUBE-SEP-` + 16 stays within iptables' 28.
const HASH_CHARS: usize = 16;
/// kube-proxy writes probabilities with `%0.10f`.
const PROBABILITY_DECIMALS: usize = 10;

/// The `KUBE-SVC-` chain of a Service port.
pub fn service_chain(service: &SyntheticService) -> String {
    let key = format!("{}{}", service.port_id(), service.protocol.lower());
    format!("{SERVICE_CHAIN_PREFIX}{}", chain_hash(&key, HASH_CHARS))
}

/// The `KUBE-SEP-` chain of one endpoint of a Service port.
pub fn endpoint_chain(service: &SyntheticService, endpoint: Ipv4Addr) -> String {
    let key = format!(
        "{}{}{endpoint}:{}",
        service.port_id(),
        service.protocol.lower(),
        service.target_port
    );
    format!("{ENDPOINT_CHAIN_PREFIX}{}", chain_hash(&key, HASH_CHARS))
}

/// The whole `nat` table for `services`, as `iptables-restore` input (load it without
/// `--noflush`: it replaces the table, built-in chains included). Services without endpoints are
/// left out (kube-proxy rejects their traffic from the `filter` table, which is not written).
pub fn ruleset(services: &[SyntheticService]) -> String {
    let mut out = String::from("*nat\n");
    for chain in BUILTIN_CHAINS {
        push_line(&mut out, format_args!(":{chain} ACCEPT [0:0]"));
    }
    declare_top_level(&mut out);
    for service in services.iter().filter(|s| !s.endpoints.is_empty()) {
        declare_service(&mut out, service);
    }
    for (chain, comment, target) in HOOKS {
        push_line(
            &mut out,
            format_args!("-A {chain} -m comment --comment \"{comment}\" -j {target}"),
        );
    }
    write_top_level_rules(&mut out, services.iter());
    for service in services.iter().filter(|s| !s.endpoints.is_empty()) {
        write_service_rules(&mut out, service);
    }
    out.push_str("COMMIT\n");
    out
}

/// The `iptables-restore --noflush` input kube-proxy's partial sync writes when the endpoints of
/// `changed` (the new version of `services[changed.index]`) changed: the top-level chains in full,
/// as on every sync, the Service's `KUBE-SVC-` chain and all its `KUBE-SEP-` chains rewritten,
/// and the chains of removed endpoints declared (which flushes them) and deleted.
///
/// # Panics
///
/// If `changed` is not a version of `services[changed.index]` or has no endpoints left.
pub fn change_endpoint(services: &[SyntheticService], changed: &SyntheticService) -> String {
    let old = &services[changed.index];
    assert_eq!(
        old.port_id(),
        changed.port_id(),
        "the changed Service must replace the one at its index"
    );
    assert!(
        !changed.endpoints.is_empty(),
        "a Service without endpoints loses its chains instead"
    );
    let removed: Vec<String> = old
        .endpoints
        .iter()
        .filter(|endpoint| !changed.endpoints.contains(endpoint))
        .map(|&endpoint| endpoint_chain(old, endpoint))
        .collect();
    let current = services.iter().map(|service| {
        if service.index == changed.index {
            changed
        } else {
            service
        }
    });

    let mut out = String::from("*nat\n");
    declare_top_level(&mut out);
    declare_service(&mut out, changed);
    for chain in &removed {
        push_line(&mut out, format_args!(":{chain} - [0:0]"));
    }
    write_top_level_rules(&mut out, current);
    write_service_rules(&mut out, changed);
    for chain in &removed {
        push_line(&mut out, format_args!("-X {chain}"));
    }
    out.push_str("COMMIT\n");
    out
}

/// Loads `input` into `node`'s tables with [`RESTORE`] (`-w`: waits for the xtables lock, which
/// is shared with every other namespace on the machine), replacing the tables it names unless
/// `noflush`. Returns the wall time, process start to exit.
pub fn load(node: &Netns, input: &str, noflush: bool) -> anyhow::Result<Duration> {
    let mut args = vec!["-w"];
    if noflush {
        args.push("--noflush");
    }
    run_with_stdin(node, RESTORE, &args, input)
}

/// Empties the nat table a load filled (its rules, then its own chains), so that the next load
/// starts from nothing.
pub fn clear(node: &Netns) -> anyhow::Result<()> {
    node.exec(COMMAND, &["-w", "-t", "nat", "-F"])?;
    node.exec(COMMAND, &["-w", "-t", "nat", "-X"])?;
    Ok(())
}

fn declare_top_level(out: &mut String) {
    for chain in TOP_LEVEL_CHAINS {
        push_line(out, format_args!(":{chain} - [0:0]"));
    }
}

fn declare_service(out: &mut String, service: &SyntheticService) {
    push_line(out, format_args!(":{} - [0:0]", service_chain(service)));
    for &endpoint in &service.endpoints {
        push_line(
            out,
            format_args!(":{} - [0:0]", endpoint_chain(service, endpoint)),
        );
    }
}

/// The rules of the chains kube-proxy rewrites on every sync, `KUBE-SERVICES` in creation order
/// (the benchmark's traffic goes to the last Service: the end of the walk).
fn write_top_level_rules<'a>(
    out: &mut String,
    services: impl Iterator<Item = &'a SyntheticService>,
) {
    push_line(
        out,
        format_args!("-A {MARK_MASQ_CHAIN} -j MARK --or-mark {MASQUERADE_MARK}"),
    );
    push_line(
        out,
        format_args!(
            "-A {POSTROUTING_CHAIN} -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
        ),
    );
    push_line(
        out,
        format_args!("-A {POSTROUTING_CHAIN} -j MARK --xor-mark {MASQUERADE_MARK}"),
    );
    push_line(
        out,
        format_args!(
            "-A {POSTROUTING_CHAIN} -m comment --comment \"kubernetes service traffic requiring \
             SNAT\" -j MASQUERADE --random-fully"
        ),
    );
    for service in services.filter(|s| !s.endpoints.is_empty()) {
        push_line(
            out,
            format_args!(
                "-A {SERVICES_CHAIN} {} -j {}",
                cluster_ip_match(service),
                service_chain(service)
            ),
        );
    }
    push_line(
        out,
        format_args!(
            "-A {SERVICES_CHAIN} -m comment --comment \"kubernetes service nodeports; NOTE: this \
             must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j \
             {NODEPORTS_CHAIN}"
        ),
    );
}

/// `-d VIP/32 -p tcp -m comment ... -m tcp --dport P`, in the order `iptables-save` prints it.
fn cluster_ip_match(service: &SyntheticService) -> String {
    let protocol = service.protocol.lower();
    format!(
        "-d {}/32 -p {protocol} -m comment --comment \"{} cluster IP\" -m {protocol} --dport {}",
        service.cluster_ip,
        service.port_id(),
        service.port
    )
}

/// A Service port's `KUBE-SVC-` chain and its `KUBE-SEP-` chains.
fn write_service_rules(out: &mut String, service: &SyntheticService) {
    let service_chain = service_chain(service);
    let port_id = service.port_id();
    let protocol = service.protocol.lower();
    // Traffic from outside the cluster is masqueraded so that replies come back through this
    // node; the benchmark client is inside CLUSTER_CIDR and is not.
    push_line(
        out,
        format_args!(
            "-A {service_chain} ! -s {CLUSTER_CIDR} {} -j {MARK_MASQ_CHAIN}",
            cluster_ip_match(service)
        ),
    );
    let count = service.endpoints.len();
    for (i, &endpoint) in service.endpoints.iter().enumerate() {
        let target = service.target_port;
        let comment = format!("-m comment --comment \"{port_id} -> {endpoint}:{target}\"");
        let chain = endpoint_chain(service, endpoint);
        let remaining = count - i;
        if remaining > 1 {
            // Each rule takes 1/remaining of what the earlier rules left: uniform overall.
            let probability = 1.0 / remaining as f64;
            push_line(
                out,
                format_args!(
                    "-A {service_chain} {comment} -m statistic --mode random --probability \
                     {probability:.PROBABILITY_DECIMALS$} -j {chain}"
                ),
            );
        } else {
            push_line(out, format_args!("-A {service_chain} {comment} -j {chain}"));
        }
    }
    for &endpoint in &service.endpoints {
        let chain = endpoint_chain(service, endpoint);
        // Hairpin: a pod reaching itself through its Service is masqueraded, or it would see
        // its own address as the source of its own request.
        push_line(
            out,
            format_args!(
                "-A {chain} -s {endpoint}/32 -m comment --comment \"{port_id}\" -j \
                 {MARK_MASQ_CHAIN}"
            ),
        );
        push_line(
            out,
            format_args!(
                "-A {chain} -p {protocol} -m comment --comment \"{port_id}\" -m {protocol} -j \
                 DNAT --to-destination {endpoint}:{}",
                service.target_port
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use lb_tests::{leftovers::TESTS, netns::unique_prefix, privilege::require_root};

    use super::*;
    use crate::workload::{Traffic, services};

    /// The dump tool matching [`RESTORE`].
    const SAVE: &str = "iptables-legacy-save";
    /// An address no synthetic Service uses.
    const NEW_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 127, 0, 1);

    fn lines_starting<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    /// `service` with its second endpoint replaced by [`NEW_ENDPOINT`]; returns the old one too.
    fn replace_second_endpoint(service: &SyntheticService) -> (SyntheticService, Ipv4Addr) {
        let mut changed = service.clone();
        let old = std::mem::replace(&mut changed.endpoints[1], NEW_ENDPOINT);
        (changed, old)
    }

    #[test]
    fn three_services_have_one_svc_chain_each_and_one_sep_chain_per_endpoint() {
        let services = services(3, 3, Traffic::Http);
        let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
        let text = ruleset(&services);
        assert!(
            text.starts_with("*nat\n") && text.ends_with("COMMIT\n"),
            "{text}"
        );
        assert_eq!(lines_starting(&text, ":KUBE-SVC-").len(), 3);
        assert_eq!(lines_starting(&text, ":KUBE-SEP-").len(), endpoints);
        // One rule per Service port, then the NodePorts jump.
        assert_eq!(lines_starting(&text, "-A KUBE-SERVICES ").len(), 3 + 1);
        // The masquerade check and one rule per endpoint.
        for service in &services {
            let chain = format!("-A {} ", service_chain(service));
            assert_eq!(
                lines_starting(&text, &chain).len(),
                1 + service.endpoints.len()
            );
            for &endpoint in &service.endpoints {
                let chain = format!("-A {} ", endpoint_chain(service, endpoint));
                assert_eq!(lines_starting(&text, &chain).len(), 2);
            }
        }
        for (chain, _, target) in HOOKS {
            assert!(text.contains(&format!("-A {chain} ")) && text.contains(target));
        }
        let chains: std::collections::BTreeSet<_> =
            lines_starting(&text, ":").into_iter().collect();
        assert_eq!(
            chains.len(),
            lines_starting(&text, ":").len(),
            "unique chains"
        );
    }

    #[test]
    fn three_endpoints_are_picked_with_a_third_then_a_half_then_unconditionally() {
        let services = services(3, 3, Traffic::Http);
        let service = &services[0];
        assert_eq!(service.endpoints.len(), 3);
        let text = ruleset(&services);
        let chain = format!("-A {} ", service_chain(service));
        let rules = lines_starting(&text, &chain);
        assert!(rules[0].contains(&format!("! -s {CLUSTER_CIDR} -d {}/32", service.cluster_ip)));
        assert!(rules[0].ends_with("-j KUBE-MARK-MASQ"));
        assert!(rules[1].contains("--mode random --probability 0.3333333333 -j KUBE-SEP-"));
        assert!(rules[2].contains("--mode random --probability 0.5000000000 -j KUBE-SEP-"));
        assert!(!rules[3].contains("statistic"), "{}", rules[3]);
        for (rule, &endpoint) in rules[1..].iter().zip(&service.endpoints) {
            assert!(rule.ends_with(&endpoint_chain(service, endpoint)), "{rule}");
        }
        let sep = endpoint_chain(service, service.endpoints[0]);
        assert!(text.contains(&format!(
            "-A {sep} -p tcp -m comment --comment \"bench/svc-0:http\" -m tcp -j DNAT \
             --to-destination {}:8080",
            service.endpoints[0]
        )));
    }

    #[test]
    fn kube_services_lists_the_services_in_creation_order_then_the_nodeports_jump() {
        let services = services(50, 1, Traffic::Http);
        let text = ruleset(&services);
        let rules = lines_starting(&text, "-A KUBE-SERVICES ");
        assert_eq!(rules.len(), services.len() + 1);
        for (rule, service) in rules.iter().zip(&services) {
            assert!(
                rule.starts_with(&format!(
                    "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m \
                     tcp --dport 80 -j {}",
                    service.cluster_ip,
                    service.port_id(),
                    service_chain(service)
                )),
                "{rule}"
            );
        }
        assert!(rules[services.len()].ends_with("--dst-type LOCAL -j KUBE-NODEPORTS"));
    }

    #[test]
    fn chain_names_of_ten_thousand_services_are_unique_and_fit_iptables() {
        /// iptables' longest chain name (XT_EXTENSION_MAXNAMELEN less the NUL).
        const MAX_CHAIN_NAME: usize = 28;
        let services = services(10_000, 3, Traffic::Http);
        let names: Vec<String> = services
            .iter()
            .flat_map(|service| {
                std::iter::once(service_chain(service)).chain(
                    service
                        .endpoints
                        .iter()
                        .map(|&endpoint| endpoint_chain(service, endpoint)),
                )
            })
            .collect();
        assert!(names.iter().all(|name| name.len() <= MAX_CHAIN_NAME));
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 10_000 * (1 + 3));
    }

    #[test]
    fn change_endpoint_rewrites_the_service_and_deletes_the_old_endpoint_chain() {
        let services = services(5, 3, Traffic::Http);
        let (changed, old) = replace_second_endpoint(&services[4]);
        let text = change_endpoint(&services, &changed);
        let old_chain = endpoint_chain(&services[4], old);
        let new_chain = endpoint_chain(&changed, NEW_ENDPOINT);
        assert!(text.starts_with("*nat\n") && text.ends_with(&format!("-X {old_chain}\nCOMMIT\n")));
        assert!(text.contains(&format!(":{old_chain} - [0:0]\n")));
        assert!(text.contains(&format!(":{new_chain} - [0:0]\n")));
        assert!(text.contains(&format!("--to-destination {NEW_ENDPOINT}:8080")));
        assert!(!text.contains(&format!("--to-destination {old}:")));
        assert!(!text.contains(&format!("-A {old_chain} ")));
        // KUBE-SERVICES in full; no other Service's chains.
        assert_eq!(lines_starting(&text, "-A KUBE-SERVICES ").len(), 5 + 1);
        assert_eq!(lines_starting(&text, ":KUBE-SVC-").len(), 1);
        assert_eq!(
            lines_starting(&text, &format!("-A {} ", service_chain(&changed))).len(),
            1 + changed.endpoints.len()
        );
    }

    /// The chains and DNAT targets `iptables-legacy-save -t nat` shows in `node`.
    fn saved_nat(node: &Netns) -> String {
        let output = node
            .exec(SAVE, &["-t", "nat"])
            .expect("iptables-legacy-save");
        String::from_utf8(output.stdout).expect("UTF-8")
    }

    #[test]
    fn iptables_legacy_restore_loads_the_ruleset_and_the_endpoint_change() {
        if !require_root("iptables_legacy_restore_loads_the_ruleset_and_the_endpoint_change") {
            return;
        }
        let node = Netns::create(&format!("{}-ipt", unique_prefix(TESTS))).expect("namespace");
        let services = services(5, 3, Traffic::Http);
        load(&node, &ruleset(&services), false).expect("full load");
        let saved = saved_nat(&node);
        assert_eq!(lines_starting(&saved, ":KUBE-SVC-").len(), 5, "{saved}");
        assert_eq!(lines_starting(&saved, ":KUBE-SEP-").len(), 15, "{saved}");
        assert_eq!(
            lines_starting(&saved, "-A KUBE-SERVICES ").len(),
            6,
            "{saved}"
        );
        let rules_before = lines_starting(&saved, "-A ").len();

        let (changed, old) = replace_second_endpoint(&services[4]);
        let old_chain = endpoint_chain(&services[4], old);
        assert!(saved.contains(&format!("--to-destination {old}:8080")));
        load(&node, &change_endpoint(&services, &changed), true).expect("partial load");
        let saved = saved_nat(&node);
        assert!(
            saved.contains(&format!("--to-destination {NEW_ENDPOINT}:8080")),
            "{saved}"
        );
        assert!(
            !saved.contains(&format!("--to-destination {old}:")),
            "{saved}"
        );
        assert!(!saved.contains(&old_chain), "{saved}");
        assert!(saved.contains(&format!(":{} ", endpoint_chain(&changed, NEW_ENDPOINT))));
        assert_eq!(lines_starting(&saved, ":KUBE-SEP-").len(), 15, "{saved}");
        // --noflush kept every other chain and the hooks, and duplicated nothing.
        assert_eq!(lines_starting(&saved, "-A ").len(), rules_before, "{saved}");
    }
}
