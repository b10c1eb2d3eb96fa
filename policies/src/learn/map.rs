//! `palisade map`: the connection log drawn as a service map, workloads as nodes and observed
//! connections as edges coloured by verdict, with their ports and counts; as SVG (opens in a
//! browser as it is) or Graphviz dot.
//!
//! A connection between two endpoints is seen twice, at the source's egress and at the
//! destination's ingress; the map counts it once: what the source's egress dropped never
//! reached the destination, and of what reached it, its ingress says what became of it (an
//! egress audit or redirect keeps its verdict).
//!
//! Plain functions of the snapshot: the same log gives the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::{FlowVerdict, Group, LogSnapshot, UNSTABLE_LABELS};
use crate::labels::Labels;
use crate::model::Direction;

/// The verdicts in the order the map lists them, with their colours.
pub const VERDICT_COLOURS: [(FlowVerdict, &str); 4] = [
    (FlowVerdict::Forwarded, "#2e7d32"),
    (FlowVerdict::Redirected, "#1565c0"),
    (FlowVerdict::Audit, "#ef6c00"),
    (FlowVerdict::Dropped, "#c62828"),
];
/// Names of members shown in a node (the rest are counted).
const MEMBERS_SHOWN: usize = 3;

pub fn colour(v: FlowVerdict) -> &'static str {
    VERDICT_COLOURS
        .iter()
        .find(|(w, _)| *w == v)
        .map_or("#000000", |(_, c)| c)
}

/// What one edge (source, destination, verdict) carried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeTally {
    /// Connections by (protocol, port).
    pub ports: BTreeMap<(u8, u16), u64>,
    /// HTTP requests seen through the L7 proxy.
    pub requests: u64,
}

impl EdgeTally {
    pub fn connections(&self) -> u64 {
        self.ports.values().sum()
    }
}

/// Workloads and who talked to whom.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMap {
    /// Every node, with the endpoints (`ns/name`) seen in it.
    pub nodes: BTreeMap<Group, BTreeSet<String>>,
    pub edges: BTreeMap<(Group, Group, FlowVerdict), EdgeTally>,
}

/// Verdict counts of one side of a connection kind.
type SideCounts = BTreeMap<FlowVerdict, u64>;

/// One connection kind (source, destination, protocol, port) as each side saw it.
#[derive(Default)]
struct BothSides {
    egress: Option<SideCounts>,
    ingress: Option<SideCounts>,
}

fn count(c: &SideCounts, v: FlowVerdict) -> u64 {
    c.get(&v).copied().unwrap_or(0)
}

/// The connections of one kind by final verdict.
fn merge_sides(s: &BothSides) -> SideCounts {
    match (&s.egress, &s.ingress) {
        (Some(one), None) | (None, Some(one)) => one.clone(),
        (None, None) => SideCounts::new(),
        (Some(e), Some(i)) => {
            use FlowVerdict::{Audit, Dropped, Forwarded, Redirected};
            // Egress drops never arrived; of what arrived, the ingress verdict stands, but
            // what egress audited or redirected stays so.
            let audit = count(e, Audit).max(count(i, Audit));
            let redirected = count(e, Redirected).max(count(i, Redirected));
            let forwarded = count(i, Forwarded)
                .saturating_sub(count(e, Audit).saturating_sub(count(i, Audit)))
                .saturating_sub(count(e, Redirected).saturating_sub(count(i, Redirected)));
            let dropped = count(e, Dropped) + count(i, Dropped);
            [
                (Forwarded, forwarded),
                (Redirected, redirected),
                (Audit, audit),
                (Dropped, dropped),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
        }
    }
}

/// The group of an endpoint from its pod labels, as flows name it (stable labels only).
pub fn workload_group(namespace: &str, labels: &Labels) -> Group {
    Group::Workload {
        namespace: namespace.to_string(),
        labels: labels
            .iter()
            .filter(|(k, _)| !UNSTABLE_LABELS.contains(&k.as_str()))
            .take(super::MAX_GROUP_LABELS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

impl ServiceMap {
    /// The map of the log's aggregates with either end in `namespace` (all when None).
    pub fn from_log(log: &LogSnapshot, namespace: Option<&str>) -> ServiceMap {
        let touches = |a: &Group, b: &Group| {
            namespace.is_none_or(|ns| a.namespace() == Some(ns) || b.namespace() == Some(ns))
        };
        let mut map = ServiceMap::default();
        let mut kinds: BTreeMap<(Group, Group, u8, u16), BothSides> = BTreeMap::new();
        let member = |map: &mut ServiceMap, g: &Group, name: &str| {
            let e = map.nodes.entry(g.clone()).or_default();
            if !name.is_empty() && g.is_workload() {
                e.insert(name.to_string());
            }
        };
        for r in &log.connections {
            let (src, dst) = r.ends();
            if !touches(src, dst) {
                continue;
            }
            let (src_name, dst_name) = match r.direction {
                Direction::Egress => (&r.seen.sample.endpoint, &r.seen.sample.peer),
                Direction::Ingress => (&r.seen.sample.peer, &r.seen.sample.endpoint),
            };
            member(&mut map, src, src_name);
            member(&mut map, dst, dst_name);
            let kind = kinds
                .entry((src.clone(), dst.clone(), r.protocol, r.port))
                .or_default();
            let side = match r.direction {
                Direction::Egress => &mut kind.egress,
                Direction::Ingress => &mut kind.ingress,
            };
            *side.get_or_insert_default().entry(r.verdict).or_default() += r.seen.count;
        }
        for ((src, dst, protocol, port), sides) in &kinds {
            for (verdict, n) in merge_sides(sides) {
                *map.edges
                    .entry((src.clone(), dst.clone(), verdict))
                    .or_default()
                    .ports
                    .entry((*protocol, *port))
                    .or_default() += n;
            }
        }
        // Requests: per side, and the side that saw more of them counts.
        let mut requests: BTreeMap<(Group, Group, FlowVerdict), [u64; 2]> = BTreeMap::new();
        for r in &log.http {
            let (src, dst) = r.ends();
            if !touches(src, dst) {
                continue;
            }
            let (src_name, dst_name) = match r.direction {
                Direction::Egress => (&r.seen.sample.endpoint, &r.seen.sample.peer),
                Direction::Ingress => (&r.seen.sample.peer, &r.seen.sample.endpoint),
            };
            member(&mut map, src, src_name);
            member(&mut map, dst, dst_name);
            let e = requests
                .entry((src.clone(), dst.clone(), r.verdict))
                .or_default();
            e[usize::from(r.direction == Direction::Ingress)] += r.seen.count;
        }
        for (key, [egress, ingress]) in requests {
            map.edges.entry(key).or_default().requests = egress.max(ingress);
        }
        map
    }

    /// Adds an endpoint with no traffic yet (so that every workload is on the map).
    pub fn add_endpoint(&mut self, group: Group, name: &str) {
        let e = self.nodes.entry(group).or_default();
        if !name.is_empty() {
            e.insert(name.to_string());
        }
    }

    fn node_lines(g: &Group, members: &BTreeSet<String>) -> Vec<String> {
        let mut lines = match g {
            Group::Workload { namespace, labels } => {
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                vec![
                    format!("namespace {namespace}"),
                    if l.is_empty() {
                        "(no labels)".to_string()
                    } else {
                        l.join(",")
                    },
                ]
            }
            Group::World { address } => vec!["world".to_string(), address.to_string()],
            Group::Host => vec!["host".to_string(), "the node".to_string()],
            Group::Reserved { name } => vec!["reserved".to_string(), name.clone()],
        };
        if !members.is_empty() {
            let shown: Vec<&str> = members
                .iter()
                .take(MEMBERS_SHOWN)
                .map(|m| m.rsplit_once('/').map_or(m.as_str(), |(_, n)| n))
                .collect();
            let more = members.len().saturating_sub(MEMBERS_SHOWN);
            let mut line = shown.join(", ");
            if more > 0 {
                let _ = write!(line, " +{more}");
            }
            lines.push(line);
        }
        lines
    }

    fn edge_label(t: &EdgeTally) -> String {
        let mut parts: Vec<String> = t
            .ports
            .iter()
            .map(|((proto, port), n)| match proto {
                1 => format!("ICMP ×{n}"),
                6 => format!("{port}/TCP ×{n}"),
                17 => format!("{port}/UDP ×{n}"),
                132 => format!("{port}/SCTP ×{n}"),
                p => format!("proto {p} ×{n}"),
            })
            .collect();
        if t.requests > 0 {
            parts.push(format!(
                "{} HTTP request{}",
                t.requests,
                if t.requests == 1 { "" } else { "s" }
            ));
        }
        parts.join(", ")
    }

    /// Columns: longest path from the sources, back edges of cycles left out.
    fn ranks(&self) -> BTreeMap<&Group, usize> {
        let index: BTreeMap<&Group, usize> =
            self.nodes.keys().enumerate().map(|(i, g)| (g, i)).collect();
        let n = index.len();
        let mut out_edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
        for (a, b, _) in self.edges.keys() {
            if let (Some(&i), Some(&j)) = (index.get(a), index.get(b))
                && i != j
            {
                out_edges[i].insert(j);
            }
        }
        // Depth-first search in node order: edges to a node on the stack are back edges.
        let mut state = vec![0u8; n]; // 0 new, 1 on stack, 2 done
        let mut forward: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut order = Vec::with_capacity(n);
        for start in 0..n {
            if state[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, out_edges[start].iter().copied().collect::<Vec<_>>())];
            state[start] = 1;
            while let Some((node, pending)) = stack.last_mut() {
                let node = *node;
                if let Some(next) = pending.pop() {
                    match state[next] {
                        0 => {
                            forward[node].push(next);
                            state[next] = 1;
                            let succ = out_edges[next].iter().copied().collect();
                            stack.push((next, succ));
                        }
                        2 => forward[node].push(next),
                        _ => {} // a back edge
                    }
                } else {
                    state[node] = 2;
                    order.push(node);
                    stack.pop();
                }
            }
        }
        let mut rank = vec![0usize; n];
        for &node in order.iter().rev() {
            for &next in &forward[node] {
                rank[next] = rank[next].max(rank[node] + 1);
            }
        }
        index.into_iter().map(|(g, i)| (g, rank[i])).collect()
    }

    /// Graphviz dot.
    pub fn to_dot(&self) -> String {
        fn q(s: &str) -> String {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        let ids: BTreeMap<&Group, usize> =
            self.nodes.keys().enumerate().map(|(i, g)| (g, i)).collect();
        let mut out = String::from(
            "digraph palisade {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f5f5f5\", fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
        );
        for (g, members) in &self.nodes {
            let shape = if g.is_workload() {
                ""
            } else {
                ", shape=ellipse, fillcolor=\"#e3f2fd\""
            };
            let _ = writeln!(
                out,
                "  n{} [label={}{shape}];",
                ids[g],
                q(&Self::node_lines(g, members).join("\n"))
            );
        }
        for ((a, b, v), t) in &self.edges {
            let (Some(i), Some(j)) = (ids.get(a), ids.get(b)) else {
                continue;
            };
            let _ = writeln!(
                out,
                "  n{i} -> n{j} [color={c}, fontcolor={c}, label={}, tooltip={}];",
                q(&Self::edge_label(t)),
                q(v.as_str()),
                c = q(colour(*v)),
            );
        }
        out.push_str("}\n");
        out
    }

    /// A standalone SVG document.
    #[expect(
        clippy::cast_precision_loss,
        reason = "pixel coordinates of at most a few thousand nodes"
    )]
    pub fn to_svg(&self) -> String {
        const ROW: f64 = 96.0;
        const LINE: f64 = 16.0;
        const CHAR: f64 = 7.2;
        const GAP: f64 = 150.0;
        const MARGIN: f64 = 30.0;
        const LEGEND: f64 = 40.0;
        let ranks = self.ranks();
        let mut columns: BTreeMap<usize, Vec<&Group>> = BTreeMap::new();
        for (g, r) in &ranks {
            columns.entry(*r).or_default().push(g);
        }
        let lines: BTreeMap<&Group, Vec<String>> = self
            .nodes
            .iter()
            .map(|(g, m)| (g, Self::node_lines(g, m)))
            .collect();
        let width_of = |g: &Group| {
            let chars = lines[g]
                .iter()
                .map(|l| l.chars().count())
                .max()
                .unwrap_or(4);
            (chars as f64 * CHAR + 24.0).clamp(110.0, 320.0)
        };
        // Boxes: (x, y, width, height), columns left to right.
        let mut boxes: BTreeMap<&Group, (f64, f64, f64, f64)> = BTreeMap::new();
        let mut x = MARGIN;
        let mut height: f64 = 0.0;
        for nodes in columns.values() {
            let col_width = nodes.iter().map(|g| width_of(g)).fold(0.0, f64::max);
            for (row, g) in nodes.iter().enumerate() {
                let h = lines[g].len() as f64 * LINE + 14.0;
                let y = MARGIN + LEGEND + row as f64 * ROW;
                boxes.insert(g, (x, y, col_width, h));
                height = height.max(y + h);
            }
            x += col_width + GAP;
        }
        let width = (x - GAP + MARGIN).max(560.0);
        let height = height + MARGIN + 24.0;
        let mut svg = String::new();
        let _ = writeln!(svg, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
        );
        svg.push_str("<title>Palisade service map</title>\n<defs>\n");
        for (v, c) in VERDICT_COLOURS {
            let _ = writeln!(
                svg,
                r#"<marker id="arrow-{}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>"#,
                v.as_str().to_ascii_lowercase()
            );
        }
        svg.push_str("</defs>\n<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n");
        // Legend.
        let mut lx = MARGIN;
        for (v, c) in VERDICT_COLOURS {
            let _ = writeln!(
                svg,
                r#"<line x1="{lx:.0}" y1="{y:.0}" x2="{x2:.0}" y2="{y:.0}" stroke="{c}" stroke-width="3"/><text x="{tx:.0}" y="{ty:.0}" fill="{c}">{}</text>"#,
                v.as_str(),
                y = MARGIN,
                x2 = lx + 26.0,
                tx = lx + 32.0,
                ty = MARGIN + 4.0,
            );
            lx += 130.0;
        }
        // Edges first, so that boxes sit on top of them.
        let mut pair_index: BTreeMap<(&Group, &Group), usize> = BTreeMap::new();
        for ((a, b, v), t) in &self.edges {
            let (Some(&(ax, ay, aw, ah)), Some(&(bx, by, bw, bh))) = (boxes.get(a), boxes.get(b))
            else {
                continue;
            };
            let k = {
                let e = pair_index.entry((a, b)).or_default();
                *e += 1;
                *e as f64
            };
            let c = colour(*v);
            let stroke =
                (1.5 + f64::from((t.connections() + t.requests).max(1).ilog2()) * 0.5).min(6.0);
            let label = xml_escape(&Self::edge_label(t));
            let marker = v.as_str().to_ascii_lowercase();
            let _ = write!(
                svg,
                r#"<g class="edge" data-verdict="{}"><title>{} → {}: {} {}</title>"#,
                v.as_str(),
                xml_escape(&a.to_string()),
                xml_escape(&b.to_string()),
                v.as_str(),
                label
            );
            let (path, lx, ly) = if a == b {
                // A loop over the top of the box.
                let (sx, sy) = (ax + aw * 0.35, ay);
                let (ex, ey) = (ax + aw * 0.65, ay);
                let lift = 26.0 + 14.0 * k;
                (
                    format!(
                        "M{sx:.1},{sy:.1} C{sx:.1},{:.1} {ex:.1},{:.1} {ex:.1},{ey:.1}",
                        sy - lift,
                        ey - lift
                    ),
                    ax + aw * 0.5,
                    ay - lift * 0.75 - 4.0,
                )
            } else {
                let (acx, acy) = (ax + aw / 2.0, ay + ah / 2.0);
                let (bcx, bcy) = (bx + bw / 2.0, by + bh / 2.0);
                let (sx, sy) = clip(acx, acy, aw, ah, bcx, bcy);
                let (ex, ey) = clip(bcx, bcy, bw, bh, acx, acy);
                let (dx, dy) = (ex - sx, ey - sy);
                let len = dx.hypot(dy).max(1.0);
                // Perpendicular offset: opposite directions bend to opposite sides, further
                // verdicts between the same pair further out.
                let off = 12.0 + 18.0 * (k - 1.0);
                let (cx, cy) = (
                    f64::midpoint(sx, ex) - dy / len * off,
                    f64::midpoint(sy, ey) + dx / len * off,
                );
                let (mx, my) = (
                    0.25 * sx + 0.5 * cx + 0.25 * ex,
                    0.25 * sy + 0.5 * cy + 0.25 * ey,
                );
                (
                    format!("M{sx:.1},{sy:.1} Q{cx:.1},{cy:.1} {ex:.1},{ey:.1}"),
                    mx,
                    my - 4.0,
                )
            };
            let _ = writeln!(
                svg,
                r##"<path d="{path}" fill="none" stroke="{c}" stroke-width="{stroke:.1}" marker-end="url(#arrow-{marker})"/><text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" font-size="10" fill="{c}" stroke="#ffffff" stroke-width="3" paint-order="stroke">{label}</text></g>"##
            );
        }
        for (g, &(x, y, w, h)) in &boxes {
            let (fill, rx) = if g.is_workload() {
                ("#f5f5f5", 8.0)
            } else {
                ("#e3f2fd", h / 2.0)
            };
            let _ = write!(
                svg,
                r##"<g class="node"><title>{}</title><rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" rx="{rx:.1}" fill="{fill}" stroke="#616161"/>"##,
                xml_escape(&g.to_string())
            );
            for (i, line) in lines[g].iter().enumerate() {
                let weight = if i == 1 { " font-weight=\"bold\"" } else { "" };
                let _ = write!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle"{weight}>{}</text>"#,
                    x + w / 2.0,
                    y + 18.0 + i as f64 * LINE,
                    xml_escape(line)
                );
            }
            svg.push_str("</g>\n");
        }
        if self.nodes.is_empty() {
            let _ = writeln!(
                svg,
                r#"<text x="{MARGIN}" y="{:.0}">No connections observed yet.</text>"#,
                MARGIN + LEGEND + 20.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// Where the segment from a box's centre towards (tx, ty) leaves the box.
fn clip(cx: f64, cy: f64, w: f64, h: f64, tx: f64, ty: f64) -> (f64, f64) {
    let (dx, dy) = (tx - cx, ty - cy);
    if dx == 0.0 && dy == 0.0 {
        return (cx, cy);
    }
    let sx = if dx == 0.0 {
        f64::INFINITY
    } else {
        (w / 2.0) / dx.abs()
    };
    let sy = if dy == 0.0 {
        f64::INFINITY
    } else {
        (h / 2.0) / dy.abs()
    };
    let s = sx.min(sy).min(1.0);
    (cx + dx * s, cy + dy * s)
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 forbids.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::learn::{ConnectionLog, LogLimits, Observation, Sample};

    fn workload(ns: &str, app: &str) -> Group {
        Group::Workload {
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "a test helper naming every field"
    )]
    fn record(
        log: &mut ConnectionLog,
        endpoint: &Group,
        direction: Direction,
        peer: &Group,
        names: (&str, &str),
        port: u16,
        verdict: FlowVerdict,
        http: Option<(&str, &str)>,
    ) {
        log.record(
            Observation {
                endpoint: endpoint.clone(),
                direction,
                peer: peer.clone(),
                protocol: 6,
                port,
                verdict,
                http: http.map(|(m, p)| (m.to_string(), p.to_string())),
                sample: Sample {
                    endpoint: names.0.into(),
                    peer_address: Ipv4Addr::new(10, 0, 0, 9),
                    peer: names.1.into(),
                    rule: String::new(),
                },
            },
            100,
        );
    }

    /// web -> api (seen at both ends, 3 forwarded, 1 dropped by api's ingress), api -> db
    /// audited at api's egress, api -> the world, a stranger dropped at its own egress, and
    /// HTTP requests web -> api.
    fn sample_log() -> LogSnapshot {
        use Direction::{Egress, Ingress};
        use FlowVerdict::{Audit, Dropped, Forwarded};
        let (web, api, db) = (
            workload("shop", "web"),
            workload("shop", "api"),
            workload("shop", "db"),
        );
        let stranger = workload("other", "x<&>\"y");
        let world = Group::World {
            address: Ipv4Addr::new(192, 0, 2, 7),
        };
        let mut log = ConnectionLog::new(LogLimits::default());
        for _ in 0..4 {
            record(
                &mut log,
                &web,
                Egress,
                &api,
                ("shop/web-1", "shop/api-1"),
                8080,
                Forwarded,
                None,
            );
        }
        for _ in 0..3 {
            record(
                &mut log,
                &api,
                Ingress,
                &web,
                ("shop/api-1", "shop/web-1"),
                8080,
                Forwarded,
                None,
            );
        }
        record(
            &mut log,
            &api,
            Ingress,
            &web,
            ("shop/api-1", "shop/web-1"),
            8080,
            Dropped,
            None,
        );
        record(
            &mut log,
            &api,
            Egress,
            &db,
            ("shop/api-1", "shop/db-1"),
            5432,
            Audit,
            None,
        );
        record(
            &mut log,
            &db,
            Ingress,
            &api,
            ("shop/db-1", "shop/api-1"),
            5432,
            Forwarded,
            None,
        );
        record(
            &mut log,
            &api,
            Egress,
            &world,
            ("shop/api-1", ""),
            443,
            Forwarded,
            None,
        );
        record(
            &mut log,
            &stranger,
            Egress,
            &db,
            ("other/stranger-1", "shop/db-1"),
            5432,
            Dropped,
            None,
        );
        for path in ["/a", "/b"] {
            record(
                &mut log,
                &api,
                Ingress,
                &web,
                ("shop/api-1", "shop/web-1"),
                8080,
                Forwarded,
                Some(("GET", path)),
            );
        }
        log.snapshot()
    }

    #[test]
    fn both_sides_of_a_connection_count_once() {
        let map = ServiceMap::from_log(&sample_log(), None);
        let (web, api, db) = (
            workload("shop", "web"),
            workload("shop", "api"),
            workload("shop", "db"),
        );
        let edge = |a: &Group, b: &Group, v| map.edges.get(&(a.clone(), b.clone(), v));
        assert_eq!(
            edge(&web, &api, FlowVerdict::Forwarded).map(|t| (t.connections(), t.requests)),
            Some((3, 2))
        );
        assert_eq!(
            edge(&web, &api, FlowVerdict::Dropped).map(EdgeTally::connections),
            Some(1)
        );
        // Audited at the source's egress, forwarded by the destination's ingress: one
        // audited connection.
        assert_eq!(
            edge(&api, &db, FlowVerdict::Audit).map(EdgeTally::connections),
            Some(1)
        );
        assert!(edge(&api, &db, FlowVerdict::Forwarded).is_none());
        assert_eq!(map.nodes.len(), 5);
        assert_eq!(
            map.nodes[&web].iter().collect::<Vec<_>>(),
            vec!["shop/web-1"]
        );
    }

    #[test]
    fn a_namespace_keeps_the_edges_that_touch_it() {
        let map = ServiceMap::from_log(&sample_log(), Some("other"));
        assert_eq!(map.edges.len(), 1);
        assert_eq!(map.nodes.len(), 2, "the stranger and the db it tried");
    }

    #[test]
    fn the_svg_is_well_formed_names_every_workload_and_colours_edges_by_verdict() {
        let mut map = ServiceMap::from_log(&sample_log(), None);
        map.add_endpoint(workload("quiet", "idle"), "quiet/idle-1");
        let svg = map.to_svg();
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.w3.org/2000/svg")
        );
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect();
        for name in [
            "web-1",
            "api-1",
            "db-1",
            "stranger-1",
            "idle-1",
            "192.0.2.7",
        ] {
            assert!(
                texts.iter().any(|t| t.contains(name)),
                "{name} missing: {texts:?}"
            );
        }
        assert!(
            texts.contains(&"app=x<&>\"y"),
            "escaped and read back: {texts:?}"
        );
        let edges: Vec<(String, String)> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("edge"))
            .map(|g| {
                let path = g.children().find(|c| c.has_tag_name("path")).unwrap();
                (
                    g.attribute("data-verdict").unwrap().to_string(),
                    path.attribute("stroke").unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(edges.len(), map.edges.len());
        for (v, stroke) in &edges {
            assert_eq!(stroke, colour(FlowVerdict::parse(v).unwrap()));
        }
        for v in ["FORWARDED", "DROPPED", "AUDIT"] {
            assert!(edges.iter().any(|(e, _)| e == v), "{v}: {edges:?}");
        }
        assert!(
            texts
                .iter()
                .any(|t| t.contains("8080/TCP ×3, 2 HTTP requests")),
            "{texts:?}"
        );
        assert_eq!(svg, map.to_svg(), "deterministic");
    }

    #[test]
    fn an_empty_map_is_still_a_document() {
        let svg = ServiceMap::default().to_svg();
        assert!(roxmltree::Document::parse(&svg).is_ok(), "{svg}");
        assert!(svg.contains("No connections observed yet."));
    }

    #[test]
    fn cycles_and_self_loops_lay_out() {
        let (a, b) = (workload("n", "a"), workload("n", "b"));
        let mut log = ConnectionLog::new(LogLimits::default());
        record(
            &mut log,
            &a,
            Direction::Egress,
            &b,
            ("n/a", "n/b"),
            1,
            FlowVerdict::Forwarded,
            None,
        );
        record(
            &mut log,
            &b,
            Direction::Egress,
            &a,
            ("n/b", "n/a"),
            2,
            FlowVerdict::Forwarded,
            None,
        );
        record(
            &mut log,
            &a,
            Direction::Egress,
            &a,
            ("n/a", "n/a2"),
            3,
            FlowVerdict::Forwarded,
            None,
        );
        let map = ServiceMap::from_log(&log.snapshot(), None);
        let ranks = map.ranks();
        assert_eq!((ranks[&a], ranks[&b]), (0, 1));
        assert!(roxmltree::Document::parse(&map.to_svg()).is_ok());
    }

    #[test]
    fn dot_names_nodes_and_colours_edges() {
        let dot = ServiceMap::from_log(&sample_log(), None).to_dot();
        assert!(dot.starts_with("digraph palisade {"));
        assert!(
            dot.contains("label=\"namespace shop\\napp=web\\nweb-1\""),
            "{dot}"
        );
        assert!(dot.contains("color=\"#c62828\""), "{dot}");
        assert!(dot.contains("app=x<&>\\\"y"), "quotes escaped: {dot}");
        assert_eq!(dot.matches(" -> ").count(), 5, "{dot}");
        assert!(dot.trim_end().ends_with('}'));
    }

    #[test]
    fn endpoints_group_by_stable_labels() {
        let labels: Labels = [
            ("app".to_string(), "web".to_string()),
            ("pod-template-hash".to_string(), "abc".to_string()),
        ]
        .into();
        assert_eq!(workload_group("shop", &labels), workload("shop", "web"));
    }
}
