//! The programs' own cost per packet: `palisade-datapath-micro` (in the integration crate,
//! since it loads the BPF programs in-process) times BPF_PROG_TEST_RUN runs and prints the
//! samples; this makes the table, with medians over the interleaved rounds.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::stats::Summary;

/// Builds and runs the measuring binary; returns its JSON.
fn samples() -> anyhow::Result<Value> {
    crate::install::ensure()?;
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "--package",
        "palisade-integration",
        "--bin",
        "palisade-datapath-micro",
    ]))?;
    let bin = crate::workspace_root().join("target/release/palisade-datapath-micro");
    let out = std::process::Command::new(&bin)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", bin.display(), out.status);
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reading the samples {} printed", bin.display()))
}

/// The table: ns per packet for each case, in each setting the binary measured.
pub fn run() -> anyhow::Result<String> {
    let v = samples()?;
    let settings = v["settings"]
        .as_array()
        .context("the samples have no settings")?;
    let column = |s: &Value| -> anyhow::Result<Vec<(String, Summary)>> {
        s["cases"]
            .as_array()
            .context("a setting without cases")?
            .iter()
            .map(|c| {
                let ns: Vec<f64> = c["ns_per_packet"]
                    .as_array()
                    .context("a case without samples")?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                Ok((
                    c["case"].as_str().unwrap_or("?").to_string(),
                    Summary::of(&ns),
                ))
            })
            .collect()
    };
    let columns = settings
        .iter()
        .map(column)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if columns.is_empty() || columns.iter().any(|c| c.len() != columns[0].len()) {
        bail!("the runs measured different cases");
    }
    let names: Vec<&str> = settings
        .iter()
        .map(|s| s["setting"].as_str().unwrap_or("?"))
        .collect();
    let mut out = format!(
        "BPF_PROG_TEST_RUN, {} runs per sample, {} rounds interleaved across cases \
         (median, min–max, ns per packet, the kernel's own timing of the program). One TCP \
         connection between endpoints A and B, tracked at both hops; B's ingress enforced. With \
         the fast path, an egress program also runs the destination's ingress verdict (and \
         rewrites the frame for `bpf_redirect_peer`), so its rows are the cost of both hops; \
         the ingress programs' rows are then what the node's path would still run (the fast \
         path skips them). One CPU runs each sample, so what the trimming saves in cache lines \
         shared between CPUs shows in `datapath` rather than here.\n\n\
         | packet: program | {} |\n|---|{}\n",
        v["repeat"],
        v["rounds"],
        names.join(" | "),
        "---|".repeat(names.len())
    );
    for (k, (name, _)) in columns[0].iter().enumerate() {
        let cells: Vec<String> = columns.iter().map(|c| c[k].1.show(1.0, 0)).collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    Ok(out)
}
