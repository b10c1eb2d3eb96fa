//! Running one generated case on the real datapath and the model side by side: every step
//! becomes frames, every frame is judged by both at each hop it crosses, and the verdict, the
//! drop reason, the mark and all of conntrack must agree after every packet. A disagreement
//! ends the case with a report a person can read: the manifests, the cluster, the flows, and
//! each packet decoded with both verdicts.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use palisade_common::conntrack::CT_FLAG_PROXY_REDIRECT;
use palisade_common::{mark, proto};
use palisade_policies::datapath_model::{
    Config, CtChange, CtEntry, CtKey, DatapathModel, Input, Judgement, Outcome, Program, Step,
    TC_ACT_REDIRECT, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
};
use palisade_policies::endpoint::EndpointId;
use palisade_policies::identity::Identity;
use palisade_policies::mapstate::{MapState, RuleId};
use palisade_policies::model::Direction;

use super::frames::{self, L4, Tuple};
use super::scenario::{
    AddrGen, Close, Cluster, FLAGS, FlowGen, FlowProto, HopGen, MarkGen, PROXY_PORT, Scenario,
    StepGen, http_rules_for, render_policies,
};
use super::{RealDatapath, RealOutcome};

/// Totals over a run, printed at the end.
#[derive(Debug, Default)]
pub struct Stats {
    pub cases: u64,
    pub packets: u64,
    pub outcomes: BTreeMap<String, u64>,
    pub steps: BTreeMap<&'static str, u64>,
    /// Packets the model would have redirected with a working proxy listener.
    pub redirects_reached: u64,
    /// Conntrack entries re-checked after a policy change, and those it stopped.
    pub revalidations: u64,
    pub revalidation_drops: u64,
    pub policy_changes: u64,
    pub connections_opened: u64,
    /// Frames BPF_PROG_TEST_RUN would not take (`frames::runnable`), not judged.
    pub unrunnable: u64,
    /// Frames the sender's program judged for the destination too (the fast path).
    pub fast_path: u64,
}

impl Stats {
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} cases, {} packets judged by both; {} policy changes, {} connections opened, {} \
             revalidations ({} stopped one), {} packets that reached a redirect, {} judged for \
             both ends on the fast path; {} frames the kernel does not test-run skipped\n",
            self.cases,
            self.packets,
            self.policy_changes,
            self.connections_opened,
            self.revalidations + self.revalidation_drops,
            self.revalidation_drops,
            self.redirects_reached,
            self.fast_path,
            self.unrunnable
        );
        let _ = writeln!(out, "  outcomes: {:?}", self.outcomes);
        let _ = writeln!(out, "  steps: {:?}", self.steps);
        out
    }
}

/// Where a frame is judged.
#[derive(Clone, Copy, Debug)]
enum At {
    Endpoint(usize),
    /// An interface that is no endpoint's.
    Unknown,
}

/// One frame and the hops it crosses, in order (a hop that drops or redirects it ends it).
struct Shot {
    label: String,
    frame: Vec<u8>,
    /// skb->mark and skb->priority.
    mark: (u32, u32),
    hops: Vec<(Program, At)>,
}

/// The environment a case runs in.
pub struct Runner<'a> {
    pub real: &'a RefCell<RealDatapath>,
    /// Endpoint interfaces (one per possible endpoint), and one that no endpoint has.
    pub ifindexes: Vec<u32>,
    pub unknown_ifindex: u32,
    /// Whether `bpf_sk_assign` can succeed here (found out by the caller).
    pub proxy_listener: bool,
    pub stats: &'a RefCell<Stats>,
}

fn describe_addr(s: &Scenario, a: AddrGen) -> String {
    match s.local(a) {
        Some(i) => format!("{} ({})", Scenario::endpoint_name(i), s.addr(a)),
        None if a == AddrGen::Host => format!("host ({})", s.addr(a)),
        None => format!("world ({})", s.addr(a)),
    }
}

fn describe_flow(s: &Scenario, f: &FlowGen) -> String {
    format!(
        "{}:{} -> {}:{} {:?}",
        describe_addr(s, f.client),
        f.client_port,
        describe_addr(s, f.server),
        f.server_port,
        f.proto
    )
}

fn protocol_number(p: FlowProto) -> u8 {
    match p {
        FlowProto::Tcp => proto::TCP,
        FlowProto::Udp => proto::UDP,
        FlowProto::Sctp => proto::SCTP,
        FlowProto::IcmpEcho | FlowProto::IcmpOther(_) => proto::ICMP,
        FlowProto::Other(n) => n,
    }
}

/// A flow's packet in one direction: its tuple and L4 (`flags` for TCP).
fn packet_of(s: &Scenario, f: &FlowGen, reply: bool, flags: u8) -> (Tuple, L4) {
    let (client, server) = (s.addr(f.client), s.addr(f.server));
    let protocol = protocol_number(f.proto);
    let (src, dst, sport, dport) = if reply {
        (server, client, f.server_port, f.client_port)
    } else {
        (client, server, f.client_port, f.server_port)
    };
    let (sport, dport, l4) = match f.proto {
        FlowProto::Tcp => (sport, dport, L4::Tcp { flags }),
        FlowProto::Udp => (sport, dport, L4::Udp),
        FlowProto::Sctp => (sport, dport, L4::Sctp),
        FlowProto::IcmpEcho => (f.client_port, f.client_port, L4::IcmpEcho { reply }),
        FlowProto::IcmpOther(kind) => (
            0,
            0,
            L4::IcmpOther {
                kind: kind + u8::from(reply),
            },
        ),
        FlowProto::Other(_) => (0, 0, L4::Other),
    };
    (
        Tuple {
            src,
            dst,
            protocol,
            sport,
            dport,
        },
        l4,
    )
}

fn flag_words(flags: u8) -> String {
    let mut v = Vec::new();
    for (bit, name) in [
        (TCP_SYN, "SYN"),
        (TCP_ACK, "ACK"),
        (TCP_PSH, "PSH"),
        (TCP_FIN, "FIN"),
        (TCP_RST, "RST"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    if v.is_empty() {
        format!("flags {flags:#04x}")
    } else {
        v.join("|")
    }
}

/// The hops of a packet from `src` to `dst` as routing takes it: the sender's egress, then
/// the receiver's ingress, each where the address is an endpoint's. A packet between two
/// non-endpoints crosses none; it is shown to the first endpoint's ingress instead.
fn route(s: &Scenario, src: AddrGen, dst: AddrGen) -> Vec<(Program, At)> {
    let mut hops = Vec::new();
    if let Some(i) = s.local(src) {
        hops.push((Program::FromEndpoint, At::Endpoint(i)));
    }
    if let Some(j) = s.local(dst) {
        hops.push((Program::ToEndpoint, At::Endpoint(j)));
    }
    if hops.is_empty() {
        hops.push((Program::ToEndpoint, At::Endpoint(0)));
    }
    hops
}

/// One hop chosen by a step.
fn hop(s: &Scenario, h: HopGen, src: AddrGen, dst: AddrGen) -> Vec<(Program, At)> {
    let all = route(s, src, dst);
    match h {
        HopGen::SenderEgress => vec![all[0]],
        HopGen::ReceiverIngress => vec![*all.last().expect("at least one hop")],
        HopGen::Elsewhere(i, egress) => {
            let p = if egress {
                Program::FromEndpoint
            } else {
                Program::ToEndpoint
            };
            vec![(p, At::Endpoint(i % s.endpoints.len()))]
        }
        HopGen::UnknownInterface(egress) => {
            let p = if egress {
                Program::FromEndpoint
            } else {
                Program::ToEndpoint
            };
            vec![(p, At::Unknown)]
        }
    }
}

impl Runner<'_> {
    /// The skb mark and priority of `m`.
    fn mark(s: &Scenario, cluster: &Cluster, m: MarkGen) -> (u32, u32) {
        let ids = cluster.identities();
        let priority = |a: AddrGen| mark::client_priority(s.addr(a).octets());
        match m {
            MarkGen::None => (0, 0),
            MarkGen::FromProxyAs(i) => (
                mark::from_proxy(ids[i % ids.len()].0),
                priority(AddrGen::Endpoint(i)),
            ),
            MarkGen::FromProxyClaiming(i, a) => {
                (mark::from_proxy(ids[i % ids.len()].0), priority(a))
            }
            MarkGen::FromProxyRaw(id) => (mark::from_proxy(id), 0),
            MarkGen::ToProxy => (mark::TO_PROXY, 0),
            MarkGen::Other(m) => (m, 0),
        }
    }

    /// The frames of one step (none for steps that change state instead).
    fn shots(s: &Scenario, cluster: &Cluster, step: &StepGen) -> Vec<Shot> {
        match step {
            StepGen::Packet {
                flow,
                reply,
                hop: which,
                flags,
                mark,
                mutation,
            } => {
                let f = s.flow(*flow);
                let flags = match flags {
                    Ok(i) => FLAGS[*i],
                    Err(raw) => *raw,
                };
                let (tuple, l4) = packet_of(s, f, *reply, flags);
                let mut frame = frames::frame(&tuple, l4);
                if let Some(damage) = mutation {
                    frames::mutate(&mut frame, *damage);
                }
                let (src, dst) = if *reply {
                    (f.server, f.client)
                } else {
                    (f.client, f.server)
                };
                let what = if f.proto == FlowProto::Tcp {
                    flag_words(flags)
                } else {
                    String::new()
                };
                vec![Shot {
                    label: format!(
                        "packet of flow {} {} {what}{}",
                        flow % s.flows.len(),
                        if *reply { "reply" } else { "original" },
                        mutation
                            .map(|m| format!(" mutated {m:?}"))
                            .unwrap_or_default()
                    ),
                    frame,
                    mark: Self::mark(s, cluster, *mark),
                    hops: hop(s, *which, src, dst),
                }]
            }
            StepGen::Exchange { flow, close } => {
                let f = s.flow(*flow);
                let mut script: Vec<(bool, u8)> = match f.proto {
                    FlowProto::Tcp => vec![
                        (false, TCP_SYN),
                        (true, TCP_SYN | TCP_ACK),
                        (false, TCP_ACK),
                        (false, TCP_PSH | TCP_ACK),
                        (true, TCP_PSH | TCP_ACK),
                    ],
                    _ => vec![(false, 0), (true, 0), (false, 0)],
                };
                if f.proto == FlowProto::Tcp {
                    match close {
                        Close::Open => {}
                        Close::Fin => script.extend([
                            (false, TCP_FIN | TCP_ACK),
                            (true, TCP_FIN | TCP_ACK),
                            (false, TCP_ACK),
                        ]),
                        Close::Rst => script.push((false, TCP_RST | TCP_ACK)),
                        Close::ServerRst => script.push((true, TCP_RST)),
                    }
                }
                script
                    .into_iter()
                    .map(|(reply, flags)| {
                        let (t, l4) = packet_of(s, f, reply, flags);
                        let (src, dst) = if reply {
                            (f.server, f.client)
                        } else {
                            (f.client, f.server)
                        };
                        Shot {
                            label: format!(
                                "exchange of flow {} {} {}",
                                flow % s.flows.len(),
                                if reply { "reply" } else { "original" },
                                if f.proto == FlowProto::Tcp {
                                    flag_words(flags)
                                } else {
                                    String::new()
                                }
                            ),
                            frame: frames::frame(&t, l4),
                            mark: (0, 0),
                            hops: route(s, src, dst),
                        }
                    })
                    .collect()
            }
            StepGen::IcmpError {
                flow,
                about_reply,
                kind,
                hop: h,
                outer_src,
                outer_dst,
                inner_len,
            } => {
                let f = s.flow(*flow);
                let (t, l4) = packet_of(s, f, *about_reply, TCP_SYN);
                let inner = frames::ip_packet(&t, l4);
                // The error goes back from the packet's receiver to its sender.
                let (sender, receiver) = if *about_reply {
                    (f.client, f.server)
                } else {
                    (f.server, f.client)
                };
                let src = outer_src.unwrap_or(sender);
                let dst = outer_dst.unwrap_or(receiver);
                vec![Shot {
                    label: format!(
                        "ICMP error type {kind} about flow {} {}",
                        flow % s.flows.len(),
                        if *about_reply { "reply" } else { "original" }
                    ),
                    frame: frames::icmp_error(s.addr(src), s.addr(dst), *kind, &inner, *inner_len),
                    mark: (0, 0),
                    hops: hop(s, *h, src, dst),
                }]
            }
            StepGen::Raw {
                endpoint,
                egress,
                bytes,
                ipv4,
            } => {
                let mut frame = bytes.clone();
                let i = endpoint % s.endpoints.len();
                if *ipv4 {
                    frame[12..14].copy_from_slice(&frames::ETH_P_IP.to_be_bytes());
                    if let Some(b) = frame.get_mut(14) {
                        *b = 0x45;
                    }
                    if let Some(p) = frame.get_mut(23) {
                        *p = [proto::TCP, proto::UDP, proto::ICMP, proto::SCTP, *p]
                            [usize::from(*p % 5)];
                    }
                    if *egress && frame.len() >= 30 {
                        frame[26..30].copy_from_slice(&s.ip(i).octets());
                    }
                }
                let p = if *egress {
                    Program::FromEndpoint
                } else {
                    Program::ToEndpoint
                };
                vec![Shot {
                    label: "arbitrary bytes".to_string(),
                    frame,
                    mark: (0, 0),
                    hops: vec![(p, At::Endpoint(i))],
                }]
            }
            StepGen::Arp { endpoint, egress } => {
                let i = endpoint % s.endpoints.len();
                let p = if *egress {
                    Program::FromEndpoint
                } else {
                    Program::ToEndpoint
                };
                vec![Shot {
                    label: "ARP".to_string(),
                    frame: frames::arp(Ipv4Addr::new(10, 200, 0, 77), s.ip(i)),
                    mark: (0, 0),
                    hops: vec![(p, At::Endpoint(i))],
                }]
            }
            StepGen::SeedRedirected { .. }
            | StepGen::PolicyChange
            | StepGen::HttpRulesFor { .. } => Vec::new(),
        }
    }

    fn ifindex(&self, at: At) -> u32 {
        match at {
            At::Endpoint(i) => self.ifindexes[i],
            At::Unknown => self.unknown_ifindex,
        }
    }

    /// Runs one case; Err is the report of the first disagreement (or of a harness failure).
    pub fn run_case(&self, s: &Scenario) -> Result<(), String> {
        self.run_case_with(s, true).map(|_| ())
    }

    /// `run_case`, with the model told whether the datapath's config is initialized (the
    /// caller sets the real one); returns every verdict, on which both agreed, and the
    /// transcript.
    pub fn run_case_with(
        &self,
        s: &Scenario,
        initialized: bool,
    ) -> Result<(Vec<Verdict>, String), String> {
        let n = s.endpoints.len();
        let mut cluster = Cluster::new(s, &self.ifindexes[..n]);
        let yaml_a = render_policies(&s.policies, "p");
        let yaml_b = s.second_policies().unwrap_or_else(|| yaml_a.clone());
        let mut header = String::new();
        let none = |y: &str| {
            if y.is_empty() {
                "    (none)".to_string()
            } else {
                indent(y)
            }
        };
        let _ = writeln!(header, "policies:\n{}", none(&yaml_a));
        if let Some(c) = &s.change {
            let _ = writeln!(
                header,
                "the policy change switches to{}:\n{}",
                c.relabel
                    .map(|(i, app)| format!(
                        " (and relabels {} app={})",
                        Scenario::endpoint_name(i % n),
                        ["a", "b", "c"][app]
                    ))
                    .unwrap_or_default(),
                none(&yaml_b)
            );
        }
        let maps = cluster
            .compile(&yaml_a)
            .map_err(|e| format!("generated manifests do not parse: {e}\n{yaml_a}"))?;
        let mut real = self.real.borrow_mut();
        real.flush_conntrack(4)?;
        real.set_fast_path(s.settings.fast_path);
        real.set_maps(&maps)?;
        let revision = real.bump_revision();
        let mut model = DatapathModel::new(revision, maps);
        let model_config = |policy_revision| Config {
            policy_revision,
            fast_path: s.settings.fast_path,
        };
        model.config = initialized.then(|| model_config(revision));
        let _ = writeln!(
            header,
            "cluster:\n{}",
            s.describe_cluster(&cluster.identities())
        );
        let _ = writeln!(header, "flows:");
        for (i, f) in s.flows.iter().enumerate() {
            let _ = writeln!(header, "  flow {i}: {}", describe_flow(s, f));
        }
        let mut transcript = String::new();
        let mut verdicts = Vec::new();
        let mut phase_b = false;
        let mut stats = self.stats.borrow_mut();
        stats.cases += 1;
        for (si, step) in s.steps.iter().enumerate() {
            *stats.steps.entry(step_kind(step)).or_default() += 1;
            let change = match step {
                StepGen::PolicyChange => {
                    phase_b = !phase_b;
                    if let Some((i, app)) = s.change.as_ref().and_then(|c| c.relabel) {
                        let app = if phase_b { app } else { s.endpoints[i % n].app };
                        cluster.relabel(i % n, app);
                    }
                    let yaml = if phase_b { &yaml_b } else { &yaml_a };
                    Some((yaml.clone(), String::new()))
                }
                StepGen::HttpRulesFor { flow, egress } => {
                    let f = s.flow(*flow);
                    let (own, other) = if *egress {
                        (f.client, f.server)
                    } else {
                        (f.server, f.client)
                    };
                    let (endpoint, egress) = match (s.local(own), s.local(other)) {
                        (Some(i), _) => (i, *egress),
                        (None, Some(i)) => (i, !*egress),
                        (None, None) => (0, *egress),
                    };
                    let extra = http_rules_for(
                        &s.endpoints[endpoint],
                        f.server_port,
                        egress,
                        &format!("h{si}"),
                    );
                    let base = if phase_b { &yaml_b } else { &yaml_a };
                    let yaml = if base.is_empty() {
                        extra.clone()
                    } else {
                        format!("{base}---\n{extra}")
                    };
                    Some((
                        yaml,
                        format!(
                            ", adding HTTP rules on port {} to the {} of {}:\n{}",
                            f.server_port,
                            if egress { "egress" } else { "ingress" },
                            Scenario::endpoint_name(endpoint),
                            indent(&extra)
                        ),
                    ))
                }
                _ => None,
            };
            match step {
                StepGen::PolicyChange | StepGen::HttpRulesFor { .. } => {
                    let (yaml, added) = change.expect("a policy change");
                    let maps = cluster
                        .compile(&yaml)
                        .map_err(|e| format!("generated manifests do not parse: {e}\n{yaml}"))?;
                    real.set_maps(&maps)?;
                    let revision = real.bump_revision();
                    model.maps = maps;
                    if initialized {
                        model.config = Some(model_config(revision));
                    }
                    stats.policy_changes += 1;
                    let _ = writeln!(
                        transcript,
                        "step {si}: policy change to the {} set{added}, revision {revision}; identities now {:?}",
                        if phase_b { "second" } else { "first" },
                        cluster.identities().iter().map(|i| i.0).collect::<Vec<_>>()
                    );
                    continue;
                }
                StepGen::SeedRedirected { flow } => {
                    let f = s.flow(*flow);
                    let Some(client) = s.local(f.client).filter(|_| f.proto == FlowProto::Tcp)
                    else {
                        let _ = writeln!(
                            transcript,
                            "step {si}: (no TCP flow from an endpoint to seed)"
                        );
                        continue;
                    };
                    let key = CtKey {
                        scope: Direction::Egress,
                        protocol: proto::TCP,
                        saddr: s.addr(f.client),
                        sport: f.client_port,
                        daddr: s.addr(f.server),
                        dport: f.server_port,
                    };
                    let entry = CtEntry {
                        endpoint: EndpointId(u32::try_from(client + 1).expect("few endpoints")),
                        peer_identity: model.maps.ipcache_lookup(key.daddr).identity,
                        rule: RuleId::NONE,
                        policy_revision: model.config.map_or(0, |c| c.policy_revision),
                        flags: CT_FLAG_PROXY_REDIRECT,
                        proxy_port: PROXY_PORT,
                        packets: 1,
                        bytes: 0,
                        proxy_client: Ipv4Addr::UNSPECIFIED,
                    };
                    real.insert_conntrack(&key, &entry);
                    model.conntrack.insert(key, entry);
                    let _ = writeln!(
                        transcript,
                        "step {si}: conntrack seeded with a proxied connection {key}"
                    );
                    continue;
                }
                _ => {}
            }
            for shot in Self::shots(s, &cluster, step) {
                let _ = writeln!(
                    transcript,
                    "step {si}: {}\n    frame: {}{}",
                    shot.label,
                    frames::describe(&shot.frame),
                    match shot.mark {
                        (0, 0) => String::new(),
                        (m, 0) => format!("\n    mark: {m:#010x}"),
                        (m, p) => format!(
                            "\n    mark: {m:#010x}, priority {p:#010x} ({})",
                            Ipv4Addr::from(p)
                        ),
                    }
                );
                if !frames::runnable(&shot.frame) {
                    stats.unrunnable += 1;
                    let _ = writeln!(transcript, "    (not run: BPF_PROG_TEST_RUN refuses it)");
                    continue;
                }
                for (program, at) in &shot.hops {
                    let ifindex = self.ifindex(*at);
                    // What a working proxy would have made of it (counted, not compared).
                    let saved = model.conntrack.clone();
                    let input = |proxy_listener| Input {
                        program: *program,
                        ifindex,
                        mark: shot.mark.0,
                        priority: shot.mark.1,
                        proxy_listener,
                        frame: &shot.frame,
                    };
                    let would = model.judge(&input(true));
                    model.conntrack = saved;
                    let judged = model.judge(&input(self.proxy_listener));
                    let got = match real.run(
                        *program,
                        &shot.frame,
                        ifindex,
                        shot.mark.0,
                        shot.mark.1,
                    ) {
                        Ok(got) => got,
                        Err(e) => {
                            return Err(format!(
                                "the datapath could not be run\n{header}transcript:\n{transcript}    {e}"
                            ));
                        }
                    };
                    stats.packets += 1;
                    *stats
                        .outcomes
                        .entry(judged.outcome.to_string())
                        .or_default() += 1;
                    if would.outcome == Outcome::Redirected {
                        stats.redirects_reached += 1;
                    }
                    for c in &judged.changes {
                        match c {
                            CtChange::Revalidated(_) => stats.revalidations += 1,
                            CtChange::Created(_) => stats.connections_opened += 1,
                            _ => {}
                        }
                    }
                    if judged.step == Step::Revalidation {
                        stats.revalidation_drops += 1;
                    }
                    let real_ct = real.conntrack()?;
                    let where_ = match at {
                        At::Endpoint(i) => {
                            format!("{} (ifindex {ifindex})", Scenario::endpoint_name(*i))
                        }
                        At::Unknown => format!("no endpoint's interface (ifindex {ifindex})"),
                    };
                    let delivered = judged
                        .fast_path
                        .filter(|_| judged.tc_action() == TC_ACT_REDIRECT)
                        .and_then(|f| model.delivered_frame(&shot.frame, f.ifindex));
                    let mut problems = compare(&judged, &got, &model.conntrack, &real_ct);
                    let frame_out = delivered.as_deref().unwrap_or(&shot.frame);
                    if got.frame_out != frame_out {
                        let differing: Vec<String> = frame_out
                            .iter()
                            .zip(&got.frame_out)
                            .enumerate()
                            .filter(|(_, (m, r))| m != r)
                            .map(|(at, (m, r))| format!("{at}: {m:#04x} vs {r:#04x}"))
                            .collect();
                        problems.push(format!(
                            "the frame out: model {}, datapath {} (bytes differing, model vs \
                             datapath: {})",
                            frames::describe(frame_out),
                            frames::describe(&got.frame_out),
                            differing.join(", ")
                        ));
                    }
                    if judged.fast_path.is_some() {
                        stats.fast_path += 1;
                    }
                    let _ = writeln!(
                        transcript,
                        "    {} on {where_}: model {} ({:?}{}{}), datapath {}{}",
                        program.name(),
                        judged.outcome,
                        judged.step,
                        if would.outcome == judged.outcome {
                            String::new()
                        } else {
                            format!("; with a proxy listener: {}", would.outcome)
                        },
                        judged
                            .fast_path
                            .map(|f| format!(
                                "; fast path to ifindex {}: {} ({:?})",
                                f.ifindex, f.outcome, f.step
                            ))
                            .unwrap_or_default(),
                        describe_real(&got),
                        if problems.is_empty() {
                            ""
                        } else {
                            "   <<<< MISMATCH"
                        }
                    );
                    if !problems.is_empty() {
                        return Err(format!(
                            "the datapath and the model disagree\n{header}transcript:\n{transcript}{}\n\nconntrack (model):\n{}conntrack (datapath):\n{}",
                            problems.join("\n"),
                            describe_ct(&model.conntrack),
                            describe_ct(&real_ct),
                        ));
                    }
                    verdicts.push(Verdict {
                        step: si,
                        program: *program,
                        endpoint: match at {
                            At::Endpoint(i) => Some(*i),
                            At::Unknown => None,
                        },
                        outcome: judged.outcome,
                    });
                    if let Some(f) = judged.fast_path {
                        // The destination's verdict was given here; the frame went past its
                        // program (or nowhere).
                        verdicts.push(Verdict {
                            step: si,
                            program: Program::ToEndpoint,
                            endpoint: self.ifindexes.iter().position(|i| *i == f.ifindex),
                            outcome: f.outcome,
                        });
                        break;
                    }
                    if matches!(judged.outcome, Outcome::Dropped(_) | Outcome::Redirected) {
                        break;
                    }
                }
            }
        }
        Ok((verdicts, format!("{header}transcript:\n{transcript}")))
    }
}

/// One packet's verdict at one hop, as both the datapath and the model gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Index of the step that sent the packet.
    pub step: usize,
    pub program: Program,
    /// The endpoint whose program judged it (None: an interface no endpoint has).
    pub endpoint: Option<usize>,
    pub outcome: Outcome,
}

fn step_kind(s: &StepGen) -> &'static str {
    match s {
        StepGen::Packet { mutation: None, .. } => "packet",
        StepGen::Packet { .. } => "mutated packet",
        StepGen::Exchange { .. } => "exchange",
        StepGen::IcmpError { .. } => "icmp error",
        StepGen::Raw { .. } => "raw bytes",
        StepGen::Arp { .. } => "arp",
        StepGen::SeedRedirected { .. } => "seeded proxied connection",
        StepGen::PolicyChange => "policy change",
        StepGen::HttpRulesFor { .. } => "HTTP rules added",
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe_real(r: &RealOutcome) -> String {
    match r.outcome() {
        Some(o) if r.counted_other_direction.is_empty() => format!("{o}"),
        _ if r.return_value == TC_ACT_REDIRECT => format!(
            "handed on by the fast path, counters {:?}, the destination's {:?}",
            r.counted, r.counted_other_direction
        ),
        _ => format!(
            "return value {} with counters {:?}",
            r.return_value, r.counted
        ),
    }
}

fn describe_ct(ct: &BTreeMap<CtKey, CtEntry>) -> String {
    if ct.is_empty() {
        return "  (empty)\n".to_string();
    }
    let mut out = String::new();
    for (k, e) in ct {
        let _ = writeln!(
            out,
            "  {k}: endpoint {} peer {} rule {} revision {} flags {:#x} proxy port {} packets {} bytes {}",
            e.endpoint.0,
            e.peer_identity.0,
            e.rule.0,
            e.policy_revision,
            e.flags,
            e.proxy_port,
            e.packets,
            e.bytes
        );
    }
    out
}

/// Everything that differs between the model's judgement and the real run.
fn compare(
    judged: &Judgement,
    got: &RealOutcome,
    model_ct: &BTreeMap<CtKey, CtEntry>,
    real_ct: &BTreeMap<CtKey, CtEntry>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let counted = |o: Outcome| vec![(o.counter(), 1)];
    let fast_path_counted = match judged.fast_path {
        Some(f) if f.outcome != Outcome::Redirected => counted(f.outcome),
        _ => Vec::new(),
    };
    let verdict_agrees = match judged.fast_path {
        None => got.outcome() == Some(judged.outcome),
        Some(_) => got.counted == counted(judged.outcome),
    };
    if !verdict_agrees
        || got.return_value != judged.tc_action()
        || got.counted_other_direction != fast_path_counted
    {
        problems.push(format!(
            "verdict: model {}{} (return value {}), datapath {}{}",
            judged.outcome,
            judged
                .fast_path
                .map(|f| format!(", fast path {}", f.outcome))
                .unwrap_or_default(),
            judged.tc_action(),
            describe_real(got),
            if got.counted_other_direction.is_empty() {
                String::new()
            } else {
                format!(
                    ", other direction's counters {:?}",
                    got.counted_other_direction
                )
            }
        ));
    }
    if got.mark != judged.mark {
        problems.push(format!(
            "mark after the run: model {:#x}, datapath {:#x}",
            judged.mark, got.mark
        ));
    }
    for (k, e) in model_ct {
        match real_ct.get(k) {
            None => problems.push(format!("conntrack: only the model has {k}")),
            Some(r) if r != e => {
                problems.push(format!("conntrack {k}: model {e:?}, datapath {r:?}"));
            }
            Some(_) => {}
        }
    }
    for k in real_ct.keys() {
        if !model_ct.contains_key(k) {
            problems.push(format!("conntrack: only the datapath has {k}"));
        }
    }
    problems
}

/// Whether the redirect can succeed under BPF_PROG_TEST_RUN here: a map state that redirects
/// a SYN on an endpoint's egress, with a transparent listener bound on the proxy port in this
/// namespace. Must run on a thread inside the test's namespace.
pub fn probe_proxy_listener(real: &RefCell<RealDatapath>, ifindex: u32) -> Result<Outcome, String> {
    use palisade_policies::mapstate::{
        Action, EndpointEntry, IpcacheEntry, PolicyEntry, PolicyKey, PortPrefix, Staged,
        StagedEnforcement,
    };
    let client = Ipv4Addr::new(10, 200, 0, 1);
    let mut maps = MapState::default();
    maps.endpoints.insert(
        EndpointId(1),
        EndpointEntry {
            ifindex,
            identity: Identity(256),
            ip: client,
            ingress_enforced: false,
            egress_enforced: false,
            audit: false,
            staged: StagedEnforcement::default(),
            link: palisade_policies::endpoint::LinkLayer::default(),
        },
    );
    maps.ipcache.insert(
        "0.0.0.0/0".parse().expect("prefix"),
        IpcacheEntry {
            identity: Identity::WORLD,
            endpoint: None,
            cidr_identity: None,
        },
    );
    maps.policy.insert(
        PolicyKey {
            endpoint: EndpointId(1),
            identity: Identity::ANY,
            direction: Direction::Egress,
            protocol: Some(proto::TCP),
            port: PortPrefix::exact(80),
        },
        PolicyEntry {
            action: Action::Redirect {
                proxy_port: PROXY_PORT,
            },
            rule: RuleId(1),
            staged: Staged::Same,
        },
    );
    let mut real = real.borrow_mut();
    real.flush_conntrack(4)?;
    real.set_maps(&maps)?;
    let syn = frames::frame(
        &Tuple {
            src: client,
            dst: Ipv4Addr::new(192, 0, 2, 1),
            protocol: proto::TCP,
            sport: 40000,
            dport: 80,
        },
        L4::Tcp { flags: TCP_SYN },
    );
    let got = real.run(Program::FromEndpoint, &syn, ifindex, 0, 0)?;
    let outcome = got
        .outcome()
        .ok_or_else(|| format!("probe: unexpected result {got:?}"))?;
    real.set_maps(&MapState::default())?;
    real.flush_conntrack(4)?;
    Ok(outcome)
}
