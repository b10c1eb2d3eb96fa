//! The upstream Kubernetes network policy conformance cases (ported as data in
//! integration/conformance/) against the real datapath. Prints the pass count.
#![expect(
    clippy::print_stdout,
    reason = "the suite's truth tables and pass count are its report"
)]

use palisade_integration::conformance::{CaseFile, Model};

#[test]
fn network_policy_conformance() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("conformance dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read case file");
        let file: CaseFile =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let stem = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        cases.extend(file.cases.into_iter().map(|c| (stem.clone(), c)));
    }
    let filter = std::env::var("CONFORMANCE_FILTER").ok();
    let model = Model::build();
    let (mut passed, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (file, case) in &cases {
        if filter
            .as_ref()
            .is_some_and(|f| !case.name.contains(f.as_str()))
        {
            continue;
        }
        if let Some(reason) = &case.skip {
            skipped.push(format!("{file}: {} — {reason}", case.name));
            continue;
        }
        let started = std::time::Instant::now();
        match model.run_case(case) {
            Ok(()) => {
                println!(
                    "PASS {file}: {} ({:.1}s)",
                    case.name,
                    started.elapsed().as_secs_f64()
                );
                passed.push(case.name.clone());
            }
            Err(diff) => {
                println!("FAIL {file}: {}\n{diff}", case.name);
                failed.push(format!("{file}: {}", case.name));
            }
        }
    }
    let upstream = cases.iter().filter(|(_, c)| c.upstream.is_some()).count();
    println!(
        "\nconformance: {} passed, {} failed, {} skipped of {} cases ({} ported from upstream)",
        passed.len(),
        failed.len(),
        skipped.len(),
        cases.len(),
        upstream
    );
    for s in &skipped {
        println!("  skipped: {s}");
    }
    assert!(
        failed.is_empty(),
        "failed cases:\n  {}",
        failed.join("\n  ")
    );
}
