//! `cargo xtask fuzz [--seconds N] [TARGET...]`: every cargo-fuzz target in turn (or the named
//! ones), each from the crate it fuzzes (`<crate>/fuzz/`, a workspace of its own; the targets
//! are what `cargo fuzz list` names there), with seed inputs, a time budget and libFuzzer's
//! per-input timeout and memory limit. Seeds are copied into the corpus before each run: a fuzz
//! crate's `seeds/<target>/`, and for `manifest` the example, demo and conformance manifests.
//! Corpora and crash artifacts stay in each fuzz crate's default `corpus/` and `artifacts/`
//! (ignored by git); each run's full output goes to `target/fuzz/<target>.log`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use palisade_integration::conformance::{CaseFile, NAMESPACES, PODS, Step};

use crate::{install, nightly_cargo, workspace_root};

/// Per input: longer is a hang (a `timeout-` artifact). Every target's inputs run in a
/// millisecond or less; 2 s gave false hangs when builds shared the 2 CPUs (an input that ran
/// in 1 ms alone was stalled past it), so the margin is wide.
const INPUT_TIMEOUT_SECONDS: u32 = 10;
const RSS_LIMIT_MB: u32 = 2048;

/// One fuzz target and the crate directory whose `fuzz/` holds it.
struct Target {
    name: String,
    /// The fuzzed crate (`cargo fuzz` runs here and finds `fuzz/`).
    dir: PathBuf,
}

impl Target {
    fn fuzz_dir(&self) -> PathBuf {
        self.dir.join("fuzz")
    }

    fn label(&self) -> String {
        let rel = self
            .dir
            .strip_prefix(workspace_root())
            .unwrap_or(&self.dir)
            .display()
            .to_string();
        format!("{rel}/fuzz {}", self.name)
    }
}

/// How a run ended.
enum Outcome {
    Clean,
    /// libFuzzer stopped on an input: a crash (panic, sanitizer report), a timeout or an
    /// out-of-memory; `artifact` is the input it wrote.
    Found {
        kind: String,
        artifact: Option<PathBuf>,
    },
    /// The fuzzer failed without naming an input (it did not start, or was killed).
    Failed(String),
}

struct Report {
    target: String,
    /// How to rerun the input that stopped it.
    reproduce: Option<String>,
    /// Wall time of `cargo fuzz run` (a rebuild, loading the corpus, fuzzing).
    elapsed: Duration,
    /// libFuzzer's own count of seconds (`Done N runs in S second(s)`), when it finished.
    fuzzed: Option<u64>,
    executions: Option<u64>,
    /// libFuzzer's own average (its loop, without start-up).
    per_second: Option<u64>,
    outcome: Outcome,
}

/// The directories holding a cargo-fuzz crate (`<dir>/fuzz/Cargo.toml` with
/// `cargo-fuzz = true`), up to two levels below the workspace root.
fn fuzzed_crates() -> anyhow::Result<Vec<PathBuf>> {
    fn subdirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() && !name.starts_with('.') && !["target", "fuzz"].contains(&name) {
                out.push(path);
            }
        }
        Ok(out)
    }
    let root = workspace_root();
    let children = subdirs(&root)?;
    let mut dirs = vec![root];
    for child in &children {
        dirs.extend(subdirs(child)?);
    }
    dirs.extend(children);
    let mut crates: Vec<PathBuf> = dirs
        .into_iter()
        .filter(|d| {
            std::fs::read_to_string(d.join("fuzz/Cargo.toml"))
                .is_ok_and(|toml| toml.contains("cargo-fuzz = true"))
        })
        .collect();
    crates.sort();
    Ok(crates)
}

/// Every target, as `cargo fuzz list` names them in each fuzz crate.
fn all_targets() -> anyhow::Result<Vec<Target>> {
    let mut targets = Vec::new();
    for dir in fuzzed_crates()? {
        let out = nightly_cargo()
            .current_dir(&dir)
            .args(["fuzz", "list"])
            .output()
            .context("running cargo fuzz list")?;
        if !out.status.success() {
            bail!(
                "cargo fuzz list in {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            targets.push(Target {
                name: name.to_string(),
                dir: dir.clone(),
            });
        }
    }
    Ok(targets)
}

/// `{{ip ns/pod}}` and `{{cidr ns/pod LEN}}` as the conformance model fills them in (pod `p` of
/// namespace `n` is 10.200.<n+1>.<10+p>); anything else is left as it is.
fn render_placeholders(text: &str) -> String {
    let ip = |pod: &str| {
        let (ns, name) = pod.split_once('/')?;
        let n = NAMESPACES.iter().position(|x| *x == ns)?;
        let p = PODS.iter().position(|x| *x == name)?;
        Some(Ipv4Addr::new(
            10,
            200,
            u8::try_from(n + 1).ok()?,
            u8::try_from(10 + p).ok()?,
        ))
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        let end = start + len;
        out.push_str(&rest[..start]);
        let words: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
        match words.as_slice() {
            ["ip", pod] if ip(pod).is_some() => {
                let _ = write!(out, "{}", ip(pod).expect("checked"));
            }
            ["cidr", pod, len] if ip(pod).is_some() && len.parse::<u8>().is_ok_and(|l| l <= 32) => {
                let len: u32 = len.parse().expect("checked");
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                let net = Ipv4Addr::from(u32::from(ip(pod).expect("checked")) & mask);
                let _ = write!(out, "{net}/{len}");
            }
            _ => out.push_str(&rest[start..end + 2]),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

fn files(dir: &Path, extension: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && extension.is_none_or(|e| path.extension().is_some_and(|x| x == e)) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Seed inputs for a target, as (file name, contents): the fuzz crate's `seeds/<target>/`,
/// and for `manifest` every example and demo policy, every conformance case file, and each
/// manifest a conformance case applies.
fn seeds(target: &Target) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let root = workspace_root();
    let mut out = Vec::new();
    let mut add_files = |dir: &Path, extension: Option<&str>| -> anyhow::Result<()> {
        for path in files(dir, extension)? {
            let rel = path.strip_prefix(&root).unwrap_or(&path);
            let name = rel.display().to_string().replace('/', "-");
            out.push((format!("seed-{name}"), std::fs::read(&path)?));
        }
        Ok(())
    };
    add_files(&target.fuzz_dir().join("seeds").join(&target.name), None)?;
    if target.name == "manifest" {
        add_files(&root.join("policies/examples"), None)?;
        add_files(&root.join("policies/demo"), None)?;
        let conformance = root.join("integration/conformance");
        add_files(&conformance, Some("yaml"))?;
        for path in files(&conformance, Some("yaml"))? {
            let text = std::fs::read_to_string(&path)?;
            let cases: CaseFile = serde_norway::from_str(&text)
                .with_context(|| format!("reading the cases of {}", path.display()))?;
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("cases");
            for case in &cases.cases {
                for (i, step) in case.steps.iter().enumerate() {
                    if let Step::Apply(manifest) = step {
                        out.push((
                            format!("seed-conformance-{stem}-{}-{i}.yaml", case.name),
                            render_placeholders(manifest).into_bytes(),
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The number in libFuzzer's last `stat::<name>: N` line.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("stat::")
            .and_then(|l| l.strip_prefix(name))
            .and_then(|l| l.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// libFuzzer's `Done N runs in S second(s)`: (N, S).
fn done(log: &str) -> Option<(u64, u64)> {
    log.lines().rev().find_map(|l| {
        let rest = l.strip_prefix("Done ")?;
        let (runs, rest) = rest.split_once(" runs in ")?;
        let seconds = rest.split_whitespace().next()?;
        Some((runs.parse().ok()?, seconds.parse().ok()?))
    })
}

/// How many inputs ran: the final stats (printed on a crash too), or the `Done` line.
fn executions(log: &str) -> Option<u64> {
    stat(log, "number_of_executed_units").or_else(|| done(log).map(|(runs, _)| runs))
}

/// The input libFuzzer wrote when it stopped (`... Test unit written to PATH`), resolved
/// against the directory the fuzzer ran in.
fn artifact(log: &str, dir: &Path) -> Option<PathBuf> {
    let path = log.lines().rev().find_map(|l| {
        l.split_once("Test unit written to ")
            .map(|(_, p)| p.trim().to_string())
    })?;
    let path = PathBuf::from(path);
    Some(if path.is_absolute() {
        path
    } else {
        dir.join(path)
    })
}

/// What kind of finding, from the artifact's name (`crash-`, `timeout-`, `oom-`, `leak-`,
/// `slow-unit-`) or libFuzzer's error line.
fn finding_kind(log: &str, artifact: Option<&Path>) -> String {
    if let Some(name) = artifact
        .and_then(|a| a.file_name())
        .and_then(|n| n.to_str())
        && let Some((kind, _)) = name.rsplit_once('-')
    {
        return kind.to_string();
    }
    if log.contains("libFuzzer: timeout") {
        "timeout".into()
    } else if log.contains("out-of-memory") {
        "oom".into()
    } else {
        "crash".into()
    }
}

/// Lines shown on the terminal: all but libFuzzer's per-input progress (`#123 NEW ...`,
/// `REDUCE`, `pulse`) and its recommended dictionary, which stay in the log.
fn shown(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let progress = words.next().is_some_and(|w| w.starts_with('#'))
        && words
            .next()
            .is_some_and(|w| ["NEW", "REDUCE", "pulse", "INITED", "RELOAD"].contains(&w));
    let dictionary = line.contains("\" # Uses: ") || line.contains(" dictionary. ######");
    !(progress || dictionary)
}

/// Copies a child's output to the log and (filtered) to stderr, and keeps it for parsing.
fn relay(
    from: impl Read + Send + 'static,
    log: Arc<Mutex<(File, String)>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if shown(&line) {
                eprintln!("  {line}");
            }
            let mut guard = log.lock().expect("log lock");
            let (file, text) = &mut *guard;
            let _ = writeln!(file, "{line}");
            text.push_str(&line);
            text.push('\n');
        }
    })
}

fn run_one(target: &Target, seconds: u64) -> anyhow::Result<Report> {
    eprintln!("\nxtask: fuzz {} for {seconds} s", target.label());
    // Build first, so the time below is the fuzzer's own.
    crate::run(
        nightly_cargo()
            .current_dir(&target.dir)
            .args(["fuzz", "build", &target.name]),
    )
    .with_context(|| format!("building fuzz target {}", target.label()))?;

    let corpus = target.fuzz_dir().join("corpus").join(&target.name);
    std::fs::create_dir_all(&corpus)?;
    let seeds = seeds(target)?;
    for (name, data) in &seeds {
        std::fs::write(corpus.join(name), data)?;
    }
    eprintln!(
        "xtask: {} seed inputs in {}",
        seeds.len(),
        corpus
            .strip_prefix(workspace_root())
            .unwrap_or(&corpus)
            .display()
    );

    let log_dir = workspace_root().join("target/fuzz");
    std::fs::create_dir_all(&log_dir)?;
    let log_path = log_dir.join(format!("{}.log", target.name));
    let log = Arc::new(Mutex::new((
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?,
        String::new(),
    )));

    let started = Instant::now();
    let mut child = nightly_cargo()
        .current_dir(&target.dir)
        .args(["fuzz", "run", &target.name, "--"])
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-print_final_stats=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo fuzz run")?;
    let relays = [
        relay(child.stdout.take().expect("piped"), Arc::clone(&log)),
        relay(child.stderr.take().expect("piped"), Arc::clone(&log)),
    ];
    let status = child.wait()?;
    for r in relays {
        let _ = r.join();
    }
    let elapsed = started.elapsed();
    let text = std::mem::take(&mut log.lock().expect("log lock").1);

    let outcome = if status.success() {
        Outcome::Clean
    } else {
        let artifact = artifact(&text, &target.dir);
        if artifact.is_some() || text.contains("==ERROR: libFuzzer") || text.contains("panicked at")
        {
            Outcome::Found {
                kind: finding_kind(&text, artifact.as_deref()),
                artifact,
            }
        } else {
            Outcome::Failed(format!(
                "cargo fuzz run {status}; see {}",
                log_path.display()
            ))
        }
    };
    let reproduce = match &outcome {
        Outcome::Found {
            artifact: Some(a), ..
        } => Some(format!(
            "(cd {} && cargo +nightly fuzz run {} {})",
            target
                .dir
                .strip_prefix(workspace_root())
                .unwrap_or(&target.dir)
                .display(),
            target.name,
            a.strip_prefix(&target.dir).unwrap_or(a).display()
        )),
        _ => None,
    };
    Ok(Report {
        target: target.label(),
        reproduce,
        elapsed,
        fuzzed: done(&text).map(|(_, seconds)| seconds),
        executions: executions(&text),
        per_second: stat(&text, "average_exec_per_sec"),
        outcome,
    })
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(seconds: u64, names: &[String]) -> anyhow::Result<()> {
    install::ensure_cargo_fuzz()?;
    let all = all_targets()?;
    let targets: Vec<&Target> = if names.is_empty() {
        all.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for name in names {
            let Some(t) = all.iter().find(|t| &t.name == name) else {
                let known: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
                bail!(
                    "no fuzz target {name:?}; the targets are {}",
                    known.join(", ")
                );
            };
            chosen.push(t);
        }
        chosen
    };
    if targets.is_empty() {
        bail!("no fuzz targets found (no <crate>/fuzz/Cargo.toml with cargo-fuzz = true)");
    }

    let mut reports = Vec::new();
    for target in targets {
        reports.push(run_one(target, seconds)?);
    }

    println!("\nfuzzing, {seconds} s per target:");
    let width = reports.iter().map(|r| r.target.len()).max().unwrap_or(0);
    let mut failed = Vec::new();
    for r in &reports {
        let execs = match (r.executions, r.per_second) {
            (Some(n), Some(rate)) => format!("{} executions ({}/s)", thousands(n), thousands(rate)),
            (Some(n), None) => format!("{} executions", thousands(n)),
            (None, _) => "executions unknown".to_string(),
        };
        let result = match &r.outcome {
            Outcome::Clean => "ok".to_string(),
            Outcome::Found { kind, artifact } => {
                let what = match artifact {
                    Some(a) => format!(
                        "{}: {}",
                        kind.to_uppercase(),
                        a.strip_prefix(workspace_root()).unwrap_or(a).display()
                    ),
                    None => format!("{} (no artifact written)", kind.to_uppercase()),
                };
                let again = r
                    .reproduce
                    .as_ref()
                    .map(|c| format!("\n    reproduce: {c}"))
                    .unwrap_or_default();
                failed.push(format!("{}: {what}{again}", r.target));
                what
            }
            Outcome::Failed(why) => {
                failed.push(format!("{}: {why}", r.target));
                format!("FAILED: {why}")
            }
        };
        // The fuzzer's own time; the wall time too when a rebuild or a big corpus added to it.
        let wall = r.elapsed.as_secs();
        let ran = match r.fuzzed {
            Some(s) if wall > s + 5 => format!("{s} s ({wall} s in all)"),
            Some(s) => format!("{s} s"),
            None => format!("{wall} s"),
        };
        println!("  {:width$}  {ran:<10}  {execs:36}  {result}", r.target);
    }
    if !failed.is_empty() {
        bail!("fuzzing found problems:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_the_conformance_model_addresses() {
        assert_eq!(
            render_placeholders("cidr: {{cidr y/b 24}}\nexcept: [{{cidr y/b 32}}] {{ip z/c}}"),
            "cidr: 10.200.2.0/24\nexcept: [10.200.2.11/32] 10.200.3.12"
        );
        assert_eq!(render_placeholders("{{cidr x/a 0}}"), "0.0.0.0/0");
        assert_eq!(
            render_placeholders("{{ip q/a}} {{what}} {{ip x/a"),
            "{{ip q/a}} {{what}} {{ip x/a"
        );
    }

    const CRASH_LOG: &str = "\
#1024\tpulse  cov: 10 ft: 20 corp: 3/40b exec/s: 512 rss: 40Mb
thread '<unnamed>' panicked at src/lib.rs:1:1:
==1234== ERROR: libFuzzer: deadly signal
artifact_prefix='/w/api/fuzz/artifacts/flow_filter/'; Test unit written to /w/api/fuzz/artifacts/flow_filter/crash-abc123
stat::number_of_executed_units: 20728
stat::average_exec_per_sec:     628
";

    #[test]
    fn a_crash_log_names_its_artifact_and_counts() {
        let a = artifact(CRASH_LOG, Path::new("/w/api"));
        assert_eq!(
            a.as_deref(),
            Some(Path::new("/w/api/fuzz/artifacts/flow_filter/crash-abc123"))
        );
        assert_eq!(finding_kind(CRASH_LOG, a.as_deref()), "crash");
        assert_eq!(executions(CRASH_LOG), Some(20728));
        assert_eq!(stat(CRASH_LOG, "average_exec_per_sec"), Some(628));
        let relative = artifact(
            "Test unit written to fuzz/artifacts/m/timeout-1f\n",
            Path::new("/w/policies"),
        );
        assert_eq!(
            relative.as_deref(),
            Some(Path::new("/w/policies/fuzz/artifacts/m/timeout-1f"))
        );
        assert_eq!(finding_kind("", relative.as_deref()), "timeout");
        assert_eq!(executions("Done 73287 runs in 61 second(s)\n"), Some(73287));
        assert_eq!(done("Done 73287 runs in 61 second(s)\n"), Some((73287, 61)));
        assert_eq!(done(CRASH_LOG), None);
    }

    #[test]
    fn progress_lines_stay_in_the_log() {
        assert!(!shown("#1024\tpulse  cov: 10 ft: 20"));
        assert!(!shown("#77\tNEW    cov: 11 ft: 21 corp: 4/44b"));
        assert!(!shown("\"demo\" # Uses: 34"));
        assert!(shown("==1234== ERROR: libFuzzer: timeout after 2 seconds"));
        assert!(shown("Done 73287 runs in 61 second(s)"));
        assert_eq!(thousands(1_322_967), "1,322,967");
        assert_eq!(thousands(628), "628");
    }
}
