//! The datapath tested against its model: the real BPF programs, loaded by the real loader
//! (`BpfDatapath::load`, maps pinned in a bpffs of the test's own), run with
//! BPF_PROG_TEST_RUN on crafted frames against map states the compiler produced, and every
//! verdict, drop reason, skb mark and conntrack entry compared with what
//! `palisade_policies::datapath_model` predicts.
//!
//! Each generated case (proptest, shrinking to a minimal case that is printed readably:
//! manifests, cluster, flows, and every packet decoded with both verdicts) is 2 to 4
//! endpoints in two labelled namespaces, with named ports and audit flags; up to three
//! policies as manifest text (Kubernetes NetworkPolicy with pod/namespace selectors, ipBlock
//! with except, endPort ranges and named ports; CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy with from/toEndpoints, from/toCIDR(Set) with except,
//! entities, toPorts with ranges, protocol ANY and HTTP rules, icmps, ingressDeny/egressDeny,
//! enableDefaultDeny) compiled with `compile_with_l7` under varied settings (enforcement
//! mode, proxy port or none, host access, the fast path on or off: on, a packet between two
//! endpoints gets both verdicts from the sender's program, which hands it straight to the
//! destination, and the frame it hands on, readdressed with its TTL one less, is compared
//! too); an optional policy change (another policy set,
//! maybe a relabelled endpoint) applied between packets as the engine applies it (map diff,
//! then a revision bump); and steps: whole exchanges (TCP handshake, data, FIN or RST from
//! either side; UDP, SCTP, ICMP echo and other ICMP, GRE) at every hop they cross, single
//! packets with any TCP flags at any hop (also misdirected, and on an interface no endpoint
//! has), with proxy marks, damaged frames (truncated at every header boundary, IHL below 5
//! or past the frame, IP options, fragments, total length shorter or longer than the frame,
//! other ethertypes, a VLAN tag, stray bytes), ICMP errors about tracked and untracked
//! tuples (also truncated, also with spoofed outer addresses), arbitrary bytes, ARP, and
//! connections seeded as if the proxy had taken them over. Cases are independent: conntrack
//! is flushed and the maps are rewritten (and read back) before each.
//!
//! `PALISADE_DIFF_CASES` sets the number of generated cases (default 1,000: about 20,000
//! packets, some 15 s in a debug build on two cores); `PROPTEST_RNG_SEED` replays a run (the
//! seed is printed). More tests run fixed cases: every kind of damaged (or misdirected) frame
//! at both hops of a few flows, before and after their connections are tracked; an
//! uninitialized datapath; and cases about one behaviour each (ICMP queries and errors, ...),
//! which check the verdicts they are about as well as the agreement.
//!
//! BPF_PROG_TEST_RUN (6.18 here) refuses frames shorter than the Ethernet header, IPv4 frames
//! without a whole 20-byte IPv4 header and IPv6 frames without 40 bytes (EINVAL); such frames
//! are skipped and counted, and the model's unit tests cover them instead.
//!
//! The proxy redirect under BPF_PROG_TEST_RUN, found out at the start of each run (and
//! printed): with a transparent listener bound on the proxy port in the test's namespace, a
//! redirected SYN still ends `PROXY_UNAVAILABLE` (on the kernel here, 6.18; most likely
//! because `bpf_sk_assign` takes only skbs at TC ingress, which a test run's is not). So the
//! harness runs the model with `proxy_listener: false`: every redirect decision is still
//! reached and checked (it must end in `PROXY_UNAVAILABLE` at exactly the packets the model
//! says would be redirected by a working proxy; the run counts them), and connections the
//! proxy would own are seeded into conntrack to check what later packets of them do. Should
//! a kernel let the assignment succeed, the probe says so and the model expects redirects.
#![expect(
    clippy::print_stderr,
    reason = "the test reports what it generated and judged, and what it found about the proxy"
)]

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};

use palisade_common::reason::drop;
use palisade_integration::differential::frames::Mutation;
use palisade_integration::differential::run::{Runner, Stats, Verdict, probe_proxy_listener};
use palisade_integration::differential::scenario::{
    AddrGen, ChangeGen, CiliumRuleGen, Close, EndpointGen, FlowGen, FlowProto, HopGen, MarkGen,
    PROXY_PORT, PolicyGen, PortChoice, PortGen, Scenario, SelectorGen, SettingsGen, StepGen,
    scenario,
};
use palisade_integration::differential::{DiffEnv, RealDatapath};
use palisade_integration::traffic;
use palisade_policies::compile::EnforcementMode;
use palisade_policies::datapath_model::{Outcome, Program};
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// Cases when `PALISADE_DIFF_CASES` is not set.
const DEFAULT_CASES: u32 = 1_000;
/// Steps per generated case, at most.
const MAX_STEPS: usize = 16;

/// What every test here needs: the namespace's interfaces, the loaded datapath, and whether
/// the proxy redirect can succeed, all on a thread inside the namespace.
fn with_datapath<T: Send + 'static>(
    test: &'static str,
    f: impl FnOnce(&Runner<'_>) -> T + Send + 'static,
) -> T {
    let env = DiffEnv::create(test, 3);
    let interfaces = env.interfaces.clone();
    let bpffs = env.bpffs();
    let out = traffic::in_netns(&env.netns, move || {
        let ifindexes: Vec<u32> = interfaces
            .iter()
            .map(|n| nix::net::if_::if_nametoindex(n.as_str()).expect("ifindex"))
            .collect();
        let real = RefCell::new(RealDatapath::load(&bpffs));
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        listener.set_reuse_address(true).expect("SO_REUSEADDR");
        listener
            .set_ip_transparent_v4(true)
            .expect("IP_TRANSPARENT");
        listener
            .bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROXY_PORT)).into())
            .expect("bind the proxy port");
        listener.listen(64).expect("listen");
        let probe = probe_proxy_listener(&real, ifindexes[0]).expect("probe");
        let proxy_listener = probe == Outcome::Redirected;
        eprintln!(
            "{test}: a redirected SYN with a listener on {PROXY_PORT} under BPF_PROG_TEST_RUN: \
             {probe}; the model runs with proxy_listener: {proxy_listener}"
        );
        let stats = RefCell::new(Stats::default());
        let runner = Runner {
            real: &real,
            ifindexes: ifindexes[..4].to_vec(),
            unknown_ifindex: ifindexes[5],
            proxy_listener,
            stats: &stats,
        };
        let out = f(&runner);
        eprintln!("{test}: {}", stats.borrow().summary());
        drop(listener);
        out
    });
    drop(env);
    out
}

#[test]
fn the_datapath_agrees_with_its_model_on_generated_cases() {
    let cases = std::env::var("PALISADE_DIFF_CASES")
        .ok()
        .map_or(DEFAULT_CASES, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("PALISADE_DIFF_CASES={v:?} is not a number"))
        });
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
                    % u128::from(u64::MAX),
            )
            .unwrap_or(0)
        });
    eprintln!("{cases} cases, seed {seed} (PROPTEST_RNG_SEED={seed} replays this run)");
    let result = with_datapath("gen", move |runner| {
        let config = Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 2048,
            rng_seed: RngSeed::Fixed(seed),
            ..Config::default()
        };
        let mut proptest = TestRunner::new(config);
        let outcome = proptest.run(&scenario(MAX_STEPS), |s| {
            runner.run_case(&s).map_err(TestCaseError::fail)
        });
        let packets = runner.stats.borrow().packets;
        match outcome {
            Ok(()) => Ok(packets),
            Err(TestError::Fail(report, _)) => {
                Err(format!("minimal failing case (seed {seed}):\n{report}"))
            }
            Err(TestError::Abort(why)) => Err(format!("aborted: {why}")),
        }
    });
    match result {
        Ok(packets) => assert!(
            packets >= 2_000 || cases < DEFAULT_CASES,
            "only {packets} packets were judged"
        ),
        Err(report) => panic!("{report}"),
    }
}

/// Two endpoints in different namespaces: ep1 (app b) takes TCP 80 from ep0 (app a) and
/// sends anywhere; ep0 is selected by no policy.
fn fixed_cluster(steps: Vec<StepGen>) -> Scenario {
    let selector = |app, namespace| SelectorGen {
        app: Some(app),
        tier: None,
        namespace,
        expression: None,
    };
    let rule = CiliumRuleGen {
        endpoints: vec![],
        cidrs: vec![],
        cidr_sets: vec![],
        entities: vec![],
        to_ports: vec![],
        icmp: None,
    };
    // ep1's policy: ingress from app a of namespace x on TCP 80; egress to everything.
    let db = PolicyGen::Cilium {
        namespace: Some(1),
        subject: selector(1, None),
        ingress: vec![CiliumRuleGen {
            endpoints: vec![selector(0, Some(0))],
            to_ports: vec![(
                vec![PortGen {
                    protocol: 1,
                    port: PortChoice::Single(1),
                }],
                false,
            )],
            ..rule.clone()
        }],
        ingress_deny: vec![],
        egress: vec![CiliumRuleGen {
            entities: vec![3],
            ..rule
        }],
        egress_deny: vec![],
        default_deny: (None, None),
    };
    Scenario {
        endpoints: vec![
            EndpointGen {
                namespace: 0,
                app: 0,
                tier: None,
                audit: false,
                named_port: None,
            },
            EndpointGen {
                namespace: 1,
                app: 1,
                tier: Some(1),
                audit: false,
                named_port: None,
            },
        ],
        ips: vec![0, 1],
        policies: vec![db],
        settings: SettingsGen {
            enforcement: EnforcementMode::Default,
            proxy_running: true,
            allow_host_ingress: true,
            fast_path: false,
        },
        change: None,
        flows: vec![
            // 0: TCP ep0 -> ep1:80, 1: UDP ep0 -> world:53, 2: ICMP echo ep0 -> ep1,
            // 3: TCP world -> ep0:22.
            FlowGen {
                client: AddrGen::Endpoint(0),
                server: AddrGen::Endpoint(1),
                proto: FlowProto::Tcp,
                client_port: 40000,
                server_port: 80,
            },
            FlowGen {
                client: AddrGen::Endpoint(0),
                server: AddrGen::World(0),
                proto: FlowProto::Udp,
                client_port: 5353,
                server_port: 53,
            },
            FlowGen {
                client: AddrGen::Endpoint(0),
                server: AddrGen::Endpoint(1),
                proto: FlowProto::IcmpEcho,
                client_port: 7,
                server_port: 0,
            },
            FlowGen {
                client: AddrGen::World(2),
                server: AddrGen::Endpoint(0),
                proto: FlowProto::Tcp,
                client_port: 50000,
                server_port: 22,
            },
        ],
        steps,
    }
}

/// Every kind of frame the programs parse, damaged at every place the parser looks, at both
/// hops of each flow, before and after the flows' connections are tracked; and each flow's
/// packets misdirected to every endpoint's programs (a foreign source or destination).
#[test]
fn every_crafted_frame_gets_the_models_verdict() {
    let mut mutations: Vec<Option<Mutation>> = vec![None];
    // Truncated at every length from the Ethernet header to past the TCP flags (those the
    // kernel refuses to run are skipped, and counted).
    mutations.extend((14..=60).map(|n| Some(Mutation::Truncate(n))));
    mutations.extend(
        (0..=0xffu8)
            .step_by(1)
            .filter(|b| b >> 4 == 4 || b % 17 == 0)
            .map(|b| Some(Mutation::VersionIhl(b))),
    );
    mutations.extend((1..=10).map(|w| Some(Mutation::Options(w))));
    mutations.extend(
        [
            0x2000u16, 0x0001, 0x2001, 0x1fff, 0x3fff, 0x4000, 0x6000, 0x8000, 0xc000, 0x4001,
        ]
        .map(|f| Some(Mutation::Fragment(f))),
    );
    mutations.extend(
        [0u16, 19, 20, 27, 28, 40, 41, 1500, 0xffff].map(|t| Some(Mutation::TotalLength(t))),
    );
    mutations.extend(
        [
            0x86ddu16, 0x0806, 0x8100, 0x88a8, 0x88cc, 0x0000, 0x05dc, 0x0801, 0xffff,
        ]
        .map(|t| Some(Mutation::Ethertype(t))),
    );
    mutations.push(Some(Mutation::VlanTag));
    mutations.push(Some(Mutation::Pad(30)));
    let mut steps = Vec::new();
    let packets = |steps: &mut Vec<StepGen>, flags: usize| {
        for flow in 0..4 {
            for reply in [false, true] {
                for hop in [HopGen::SenderEgress, HopGen::ReceiverIngress] {
                    for m in &mutations {
                        steps.push(StepGen::Packet {
                            flow,
                            reply,
                            hop,
                            flags: Ok(flags),
                            mark: MarkGen::None,
                            mutation: *m,
                        });
                    }
                }
            }
        }
    };
    // As they come (SYN: the first whole one opens its connection), then mid-stream (ACK)
    // after each flow's exchange.
    packets(&mut steps, 0);
    for flow in 0..4 {
        steps.push(StepGen::Exchange {
            flow,
            close: Close::Open,
        });
    }
    packets(&mut steps, 2);
    // ICMP errors about each flow's packets, tracked or not, whole and cut at every length
    // of the embedded header and ports.
    for flow in 0..4 {
        for about_reply in [false, true] {
            for inner_len in (0..=28).map(Some).chain([None]) {
                for hop in [HopGen::SenderEgress, HopGen::ReceiverIngress] {
                    steps.push(StepGen::IcmpError {
                        flow,
                        about_reply,
                        kind: [3, 11, 12][flow % 3],
                        hop,
                        outer_src: None,
                        outer_dst: None,
                        inner_len,
                    });
                }
            }
        }
    }
    // Every flow's packets where routing would never take them: at each endpoint's egress
    // (a source that is not the endpoint's) and ingress (a destination that is not).
    for flow in 0..4 {
        for reply in [false, true] {
            for endpoint in 0..2 {
                for egress in [false, true] {
                    steps.push(StepGen::Packet {
                        flow,
                        reply,
                        hop: HopGen::Elsewhere(endpoint, egress),
                        flags: Ok(2),
                        mark: MarkGen::None,
                        mutation: None,
                    });
                }
            }
        }
    }
    steps.push(StepGen::Arp {
        endpoint: 0,
        egress: true,
    });
    steps.push(StepGen::Arp {
        endpoint: 1,
        egress: false,
    });
    let s = fixed_cluster(steps);
    let result = with_datapath("frames", move |runner| runner.run_case(&s));
    if let Err(report) = result {
        panic!("{report}");
    }
}

/// Before the agent writes the config, everything is dropped, on any interface.
#[test]
fn an_uninitialized_datapath_drops_everything() {
    let result = with_datapath("uninit", |runner| {
        let s = fixed_cluster(vec![StepGen::Exchange {
            flow: 0,
            close: Close::Fin,
        }]);
        runner.real.borrow_mut().set_initialized(false);
        let r = runner.run_case_with(&s, false).map(|_| ());
        runner.real.borrow_mut().set_initialized(true);
        r
    });
    if let Err(report) = result {
        panic!("{report}");
    }
}

/// The verdict of step `step` at `program` of endpoint `endpoint`, or a report of what there
/// was.
fn verdict_at(
    verdicts: &[Verdict],
    transcript: &str,
    step: usize,
    program: Program,
    endpoint: usize,
) -> Outcome {
    verdicts
        .iter()
        .find(|v| v.step == step && v.program == program && v.endpoint == Some(endpoint))
        .map_or_else(
            || panic!("no verdict of step {step} at {program:?} of ep{endpoint}\n{transcript}"),
            |v| v.outcome,
        )
}

/// Runs `s`, which both must agree on, and checks the verdicts `expected` names: (step,
/// program, endpoint, outcome).
fn run_expecting(test: &'static str, s: Scenario, expected: Vec<(usize, Program, usize, Outcome)>) {
    let result = with_datapath(test, move |runner| runner.run_case_with(&s, true));
    let (verdicts, transcript) = result.unwrap_or_else(|report| panic!("{report}"));
    for (step, program, endpoint, want) in expected {
        let got = verdict_at(&verdicts, &transcript, step, program, endpoint);
        assert_eq!(
            got, want,
            "step {step} at {program:?} of ep{endpoint}: {got}, expected {want}\n{transcript}"
        );
    }
}

fn selector(app: usize, namespace: Option<usize>) -> SelectorGen {
    SelectorGen {
        app: Some(app),
        tier: None,
        namespace,
        expression: None,
    }
}

fn icmp_rule(from: SelectorGen, echo: bool) -> CiliumRuleGen {
    CiliumRuleGen {
        endpoints: vec![from],
        cidrs: vec![],
        cidr_sets: vec![],
        entities: vec![],
        to_ports: vec![],
        icmp: Some(echo),
    }
}

/// ICMP as conntrack must see it: queries pair up by identifier and type (a request never
/// passes as a reply, another type never as part of a query), other ICMP is never tracked,
/// revalidation judges each query by its own type; an ICMP error passes only back to the
/// source of a tracked packet of the connection's original direction, and an endpoint only
/// sends errors about packets addressed to itself, from its own address.
#[test]
fn icmp_queries_pair_by_type_and_errors_match_their_connection() {
    use Program::{FromEndpoint as Out, ToEndpoint as In};
    let denied = Outcome::Dropped(drop::POLICY_DENIED);
    let mismatch = Outcome::Dropped(drop::ICMP_ERROR_MISMATCH);
    let spoofed = Outcome::Dropped(drop::INVALID_SOURCE_IP);
    let fwd = Outcome::Forwarded;
    // ep0 (app a, namespace x) takes nothing in; ep1 (app b, namespace y) takes echo and
    // timestamp requests from ep0, and after the change echo requests only; and UDP 53 from
    // the world throughout.
    let ep0_closed = PolicyGen::Kubernetes {
        namespace: 0,
        subject: selector(0, None),
        types: Some((true, false)),
        ingress: vec![],
        egress: vec![],
    };
    let ep1_icmp = |timestamp: bool| PolicyGen::Cilium {
        namespace: Some(1),
        subject: selector(1, None),
        ingress: [
            Some(icmp_rule(selector(0, Some(0)), true)),
            timestamp.then(|| icmp_rule(selector(0, Some(0)), false)),
            Some(CiliumRuleGen {
                endpoints: vec![],
                entities: vec![0],
                to_ports: vec![(
                    vec![PortGen {
                        protocol: 2,
                        port: PortChoice::Single(0),
                    }],
                    false,
                )],
                icmp: None,
                ..icmp_rule(selector(0, None), true)
            }),
        ]
        .into_iter()
        .flatten()
        .collect(),
        ingress_deny: vec![],
        egress: vec![],
        egress_deny: vec![],
        default_deny: (None, None),
    };
    let flow = |client, server, proto, client_port, server_port| FlowGen {
        client,
        server,
        proto,
        client_port,
        server_port,
    };
    let (e0, e1) = (AddrGen::Endpoint(0), AddrGen::Endpoint(1));
    let flows = vec![
        // 0: ep0 pings ep1 (id 7); 1: ep0's timestamp request (type 13, id 0) to ep1;
        // 2: ep1's own echo request to ep0, with ep0's id; 3: ep1 sends ep0 a redirect (5);
        // 4: ep0's type 42 to ep1; 5: UDP ep0 -> world:53; 6: UDP world -> ep1:53.
        flow(e0, e1, FlowProto::IcmpEcho, 7, 0),
        flow(e0, e1, FlowProto::IcmpOther(13), 0, 0),
        flow(e1, e0, FlowProto::IcmpEcho, 7, 0),
        flow(e1, e0, FlowProto::IcmpOther(5), 0, 0),
        flow(e0, e1, FlowProto::IcmpOther(42), 0, 0),
        flow(e0, AddrGen::World(0), FlowProto::Udp, 5353, 53),
        flow(AddrGen::World(0), e1, FlowProto::Udp, 5353, 53),
    ];
    let packet = |flow, reply, hop| StepGen::Packet {
        flow,
        reply,
        hop,
        flags: Ok(0),
        mark: MarkGen::None,
        mutation: None,
    };
    let error = |flow, hop, outer_src, outer_dst| StepGen::IcmpError {
        flow,
        about_reply: false,
        kind: 3,
        hop,
        outer_src,
        outer_dst,
        inner_len: None,
    };
    let steps = vec![
        // 0, 1: both queries and their replies pass.
        StepGen::Exchange {
            flow: 0,
            close: Close::Open,
        },
        StepGen::Exchange {
            flow: 1,
            close: Close::Open,
        },
        // 2: ep1's echo request with ep0's identifier is no reply.
        packet(2, false, HopGen::ReceiverIngress),
        // 3: a redirect is part of no query's connection, 4: nor is another type.
        packet(3, false, HopGen::ReceiverIngress),
        packet(4, false, HopGen::ReceiverIngress),
        // 5: an echo reply from ep0 that ep1 never asked for.
        packet(2, true, HopGen::ReceiverIngress),
        // 6, 7: the UDP flows are tracked.
        StepGen::Exchange {
            flow: 5,
            close: Close::Open,
        },
        StepGen::Exchange {
            flow: 6,
            close: Close::Open,
        },
        // 8: a router reports on ep0's UDP to ep0: related.
        error(5, HopGen::ReceiverIngress, Some(AddrGen::World(3)), None),
        // 9: the same error, addressed to ep1.
        error(
            5,
            HopGen::ReceiverIngress,
            Some(AddrGen::World(3)),
            Some(e1),
        ),
        // 10: ep1 reports on the world's UDP to it, back to the world: related.
        error(6, HopGen::SenderEgress, None, None),
        // 11: ep1 sends the error elsewhere, 12: from another address.
        error(6, HopGen::SenderEgress, None, Some(AddrGen::World(2))),
        error(6, HopGen::Elsewhere(1, true), Some(AddrGen::World(3)), None),
        // 13: ep0 reports on the world's UDP to ep1, which it never received.
        error(6, HopGen::SenderEgress, Some(e0), None),
        // 14, 15: after the change, the timestamp connection is re-judged as a timestamp.
        StepGen::PolicyChange,
        packet(1, false, HopGen::ReceiverIngress),
        // 16: the echo connection is still allowed.
        packet(0, false, HopGen::ReceiverIngress),
    ];
    let mut s = fixed_cluster(steps);
    s.policies = vec![ep0_closed.clone(), ep1_icmp(true)];
    s.change = Some(ChangeGen {
        keep: false,
        policies: vec![ep0_closed, ep1_icmp(false)],
        relabel: None,
    });
    s.flows = flows;
    let revalidation_drop = denied;
    run_expecting(
        "icmp",
        s,
        vec![
            (0, In, 0, fwd),
            (1, In, 0, fwd),
            (1, In, 1, fwd),
            (2, In, 0, denied),
            (3, In, 0, denied),
            (4, In, 1, denied),
            (5, In, 1, denied),
            (8, In, 0, fwd),
            (9, In, 1, mismatch),
            (10, Out, 1, fwd),
            (11, Out, 1, mismatch),
            (12, Out, 1, spoofed),
            (13, Out, 0, mismatch),
            (15, In, 1, revalidation_drop),
            (16, In, 1, fwd),
        ],
    );
}

/// The proxy's upstream leg is judged as the client's own connection would be: by the
/// ipcache's identity and CIDR alias for the client's address (carried in the priority), so
/// the server's CIDR rules hold through the proxy, when it opens and when a policy change
/// re-checks it; a mark whose identity the address does not have is refused.
#[test]
fn the_proxys_upstream_leg_is_judged_by_the_clients_address() {
    use Program::ToEndpoint as In;
    let app_a = || EndpointGen {
        namespace: 0,
        app: 0,
        tier: None,
        audit: false,
        named_port: None,
    };
    let cidr_rule = |cidr: usize, ports: Vec<PortGen>| CiliumRuleGen {
        endpoints: vec![],
        cidrs: vec![cidr],
        cidr_sets: vec![],
        entities: vec![],
        to_ports: if ports.is_empty() {
            vec![]
        } else {
            vec![(ports, false)]
        },
        icmp: None,
    };
    let tcp = |port| PortGen {
        protocol: 1,
        port: PortChoice::Single(port),
    };
    // ep1's ingress: app a on TCP 80 through the proxy (HTTP rules), but never from
    // 10.200.0.5/32 (ep2, which is app a too); TCP 8080 from 10.200.0.0/30 only (ep0).
    // After the change, nothing from 10.200.0.0/30 either.
    let server = |deny_ep0: bool| PolicyGen::Cilium {
        namespace: Some(1),
        subject: selector(1, None),
        ingress: vec![
            CiliumRuleGen {
                endpoints: vec![selector(0, Some(0))],
                to_ports: vec![(vec![tcp(1)], true)],
                ..cidr_rule(0, vec![])
            },
            cidr_rule(2, vec![tcp(4)]),
        ],
        ingress_deny: [
            Some(cidr_rule(3, vec![])),
            deny_ep0.then(|| cidr_rule(2, vec![])),
        ]
        .into_iter()
        .flatten()
        .collect(),
        egress: vec![],
        egress_deny: vec![],
        default_deny: (None, None),
    };
    let upstream = |client_port, server_port| FlowGen {
        client: AddrGen::Host,
        server: AddrGen::Endpoint(1),
        proto: FlowProto::Tcp,
        client_port,
        server_port,
    };
    let syn = |flow, mark| StepGen::Packet {
        flow,
        reply: false,
        hop: HopGen::ReceiverIngress,
        flags: Ok(0),
        mark,
        mutation: None,
    };
    let s = Scenario {
        endpoints: vec![
            app_a(),
            EndpointGen {
                namespace: 1,
                app: 1,
                ..app_a()
            },
            app_a(),
        ],
        // 10.200.0.1, 10.200.0.2, 10.200.0.5.
        ips: vec![0, 1, 2],
        policies: vec![server(false)],
        settings: SettingsGen {
            enforcement: EnforcementMode::Default,
            proxy_running: true,
            allow_host_ingress: true,
            fast_path: false,
        },
        change: Some(ChangeGen {
            keep: false,
            policies: vec![server(true)],
            relabel: None,
        }),
        flows: vec![
            upstream(40000, 80),
            upstream(40001, 80),
            upstream(40002, 8080),
            upstream(40003, 80),
        ],
        steps: vec![
            // 0: for ep0, through the proxy to port 80: allowed.
            syn(0, MarkGen::FromProxyAs(0)),
            // 1: for ep2, of the same identity, but in the denied CIDR.
            syn(1, MarkGen::FromProxyAs(2)),
            // 2: for ep0 to 8080, which only its CIDR allows.
            syn(2, MarkGen::FromProxyAs(0)),
            // 3: ep0's identity, claimed for a world address.
            syn(3, MarkGen::FromProxyClaiming(0, AddrGen::World(0))),
            // 4, 5: after the change, ep0's open upstream leg is in a denied CIDR.
            StepGen::PolicyChange,
            StepGen::Packet {
                flow: 0,
                reply: false,
                hop: HopGen::ReceiverIngress,
                flags: Ok(2),
                mark: MarkGen::FromProxyAs(0),
                mutation: None,
            },
        ],
    };
    run_expecting(
        "proxy",
        s,
        vec![
            (0, In, 1, Outcome::Forwarded),
            (1, In, 1, Outcome::Dropped(drop::POLICY_DENY_RULE)),
            (2, In, 1, Outcome::Forwarded),
            (3, In, 1, Outcome::Dropped(drop::PROXY_CLIENT_MISMATCH)),
            (5, In, 1, Outcome::Dropped(drop::POLICY_DENY_RULE)),
        ],
    );
}

/// A policy change re-judges connections as new ones would be judged, audit mode included:
/// what the new policy denies goes on audited (the packets count as AUDIT, the entry says
/// so), what it allows again is no longer audited.
#[test]
fn revalidation_in_audit_mode_audits_what_is_now_denied() {
    use Program::ToEndpoint as In;
    let tcp = |port| PortGen {
        protocol: 1,
        port: PortChoice::Single(port),
    };
    // ep1 (audit mode) takes TCP 80 from ep0, after the change TCP 81 instead.
    let server = |port| PolicyGen::Cilium {
        namespace: Some(1),
        subject: selector(1, None),
        ingress: vec![CiliumRuleGen {
            to_ports: vec![(vec![tcp(port)], false)],
            icmp: None,
            ..icmp_rule(selector(0, Some(0)), true)
        }],
        ingress_deny: vec![],
        egress: vec![],
        egress_deny: vec![],
        default_deny: (None, None),
    };
    let ack = |flow, reply, hop| StepGen::Packet {
        flow,
        reply,
        hop,
        flags: Ok(2),
        mark: MarkGen::None,
        mutation: None,
    };
    let mut s = fixed_cluster(vec![
        // 0: to 80, allowed; 1: to 81, audited.
        StepGen::Exchange {
            flow: 0,
            close: Close::Open,
        },
        StepGen::Exchange {
            flow: 1,
            close: Close::Open,
        },
        StepGen::PolicyChange,
        // 3, 4: the connection to 80 goes on audited, both ways.
        ack(0, false, HopGen::ReceiverIngress),
        ack(0, true, HopGen::SenderEgress),
        // 5: the one to 81 is allowed now.
        ack(1, false, HopGen::ReceiverIngress),
    ]);
    s.endpoints[1].audit = true;
    s.policies = vec![server(1)];
    s.change = Some(ChangeGen {
        keep: false,
        policies: vec![server(2)],
        relabel: None,
    });
    s.flows = vec![
        FlowGen {
            client: AddrGen::Endpoint(0),
            server: AddrGen::Endpoint(1),
            proto: FlowProto::Tcp,
            client_port: 40000,
            server_port: 80,
        },
        FlowGen {
            client: AddrGen::Endpoint(0),
            server: AddrGen::Endpoint(1),
            proto: FlowProto::Tcp,
            client_port: 40001,
            server_port: 81,
        },
    ];
    run_expecting(
        "audit",
        s,
        vec![
            (0, In, 1, Outcome::Forwarded),
            (1, In, 1, Outcome::Audit),
            (3, In, 1, Outcome::Audit),
            (4, Program::FromEndpoint, 1, Outcome::Audit),
            (5, In, 1, Outcome::Forwarded),
        ],
    );
}

/// A policy in audit (staged) enforces nothing: what it would deny is forwarded as AUDIT, by
/// the entry and endpoint flags the compiler merges in, and the connection's entry says so.
/// Once the same policy is in force, a policy change like any other, the open connection it
/// denies stops and the one it allows goes on, no longer audited.
#[test]
fn a_policy_in_audit_audits_what_it_would_deny_until_it_is_in_force() {
    use Program::ToEndpoint as In;
    let tcp = |port| PortGen {
        protocol: 1,
        port: PortChoice::Single(port),
    };
    // ep1 takes TCP 80 from ep0, and denies it TCP 443.
    let server = PolicyGen::Cilium {
        namespace: Some(1),
        subject: selector(1, None),
        ingress: vec![CiliumRuleGen {
            to_ports: vec![(vec![tcp(1)], false)],
            icmp: None,
            ..icmp_rule(selector(0, Some(0)), true)
        }],
        ingress_deny: vec![CiliumRuleGen {
            to_ports: vec![(vec![tcp(3)], false)],
            icmp: None,
            ..icmp_rule(selector(0, Some(0)), true)
        }],
        egress: vec![],
        egress_deny: vec![],
        default_deny: (None, None),
    };
    let ack = |flow| StepGen::Packet {
        flow,
        reply: false,
        hop: HopGen::ReceiverIngress,
        flags: Ok(2),
        mark: MarkGen::None,
        mutation: None,
    };
    let open = |flow| StepGen::Exchange {
        flow,
        close: Close::Open,
    };
    let mut s = fixed_cluster(vec![
        // 0: allowed by both; 1: only the staged default deny; 2: the staged deny rule.
        open(0),
        open(1),
        open(2),
        StepGen::PolicyChange,
        // 4: goes on; 5, 6: stop.
        ack(0),
        ack(1),
        ack(2),
    ]);
    s.policies = vec![PolicyGen::Staged(Box::new(server.clone()))];
    s.change = Some(ChangeGen {
        keep: false,
        policies: vec![server],
        relabel: None,
    });
    let flow = |client_port, server_port| FlowGen {
        client: AddrGen::Endpoint(0),
        server: AddrGen::Endpoint(1),
        proto: FlowProto::Tcp,
        client_port,
        server_port,
    };
    s.flows = vec![flow(40000, 80), flow(40001, 81), flow(40002, 443)];
    run_expecting(
        "staged",
        s,
        vec![
            (0, In, 1, Outcome::Forwarded),
            (1, In, 1, Outcome::Audit),
            (2, In, 1, Outcome::Audit),
            (4, In, 1, Outcome::Forwarded),
            (5, In, 1, Outcome::Dropped(drop::POLICY_DENIED)),
            (6, In, 1, Outcome::Dropped(drop::POLICY_DENY_RULE)),
        ],
    );
}

/// A flow other than TCP that a policy change sends to the L7 proxy (which takes TCP only)
/// stops, as a new one is dropped; an open TCP connection stops as ever.
#[test]
fn a_udp_flow_that_policy_now_sends_to_the_proxy_stops() {
    use Program::ToEndpoint as In;
    // After the change, ep1 has HTTP rules on port 53 of any protocol.
    let http_53 = PolicyGen::Cilium {
        namespace: Some(1),
        subject: selector(1, None),
        ingress: vec![CiliumRuleGen {
            to_ports: vec![(
                vec![PortGen {
                    protocol: 4,
                    port: PortChoice::Single(0),
                }],
                true,
            )],
            icmp: None,
            ..icmp_rule(selector(0, Some(0)), true)
        }],
        ingress_deny: vec![],
        egress: vec![],
        egress_deny: vec![],
        default_deny: (None, None),
    };
    let packet = |flow| StepGen::Packet {
        flow,
        reply: false,
        hop: HopGen::ReceiverIngress,
        flags: Ok(2),
        mark: MarkGen::None,
        mutation: None,
    };
    let mut s = fixed_cluster(vec![
        StepGen::Exchange {
            flow: 0,
            close: Close::Open,
        },
        StepGen::Exchange {
            flow: 1,
            close: Close::Open,
        },
        StepGen::PolicyChange,
        // 3: the UDP flow is stopped, 4: and stays so; 5: the TCP connection too.
        packet(0),
        packet(0),
        packet(1),
    ]);
    s.policies = vec![];
    s.change = Some(ChangeGen {
        keep: false,
        policies: vec![http_53],
        relabel: None,
    });
    s.flows = vec![
        FlowGen {
            client: AddrGen::Endpoint(0),
            server: AddrGen::Endpoint(1),
            proto: FlowProto::Udp,
            client_port: 5353,
            server_port: 53,
        },
        FlowGen {
            client: AddrGen::Endpoint(0),
            server: AddrGen::Endpoint(1),
            proto: FlowProto::Tcp,
            client_port: 40000,
            server_port: 53,
        },
    ];
    run_expecting(
        "udp-proxy",
        s,
        vec![
            (0, In, 1, Outcome::Forwarded),
            (3, In, 1, Outcome::Dropped(drop::PROXY_UNSUPPORTED_PROTOCOL)),
            (4, In, 1, Outcome::Dropped(drop::PROXY_UNSUPPORTED_PROTOCOL)),
            (5, In, 1, Outcome::Dropped(drop::PROXY_REQUIRED)),
        ],
    );
}
