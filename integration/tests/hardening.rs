//! Hardening end to end: the agent starts on a machine without bpffs mounted, and untrusted
//! input never stalls it.

use std::time::{Duration, Instant};

use palisade_integration::Node;

#[test]
fn default_bpffs_is_mounted_where_the_machine_has_none() {
    let node = Node::start_with_fresh_bpffs("fresh-bpffs");
    let status = node.json(&["status"]);
    assert_eq!(status["maps_in_sync"], true, "{status}");
    let log = node.agent_log();
    assert!(
        log.contains("mounted bpffs path=/sys/fs/bpf"),
        "the agent should have mounted /sys/fs/bpf itself:\n{log}"
    );
}

#[test]
fn a_hostile_manifest_is_refused_at_once_while_the_agent_answers() {
    let node = Node::start("hostile-manifest");
    let depth = 100_000;
    let hostile = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: a, namespace: x}}\nspec:\n  podSelector: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert!(hostile.len() > 200_000);
    std::thread::scope(|s| {
        let applying = s.spawn(|| {
            let started = Instant::now();
            let out = node.try_apply(&hostile);
            (out, started.elapsed())
        });
        // Meanwhile the agent keeps answering.
        for _ in 0..5 {
            let started = Instant::now();
            node.palisade_ok(&["status"]);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "status took {:?}",
                started.elapsed()
            );
        }
        let (out, took) = applying.join().expect("apply thread");
        assert!(!out.status.success(), "a hostile manifest was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("document 1") && err.contains("nested more than 64 levels deep"),
            "{err}"
        );
        assert!(took < Duration::from_secs(1), "refusing it took {took:?}");
    });
    // A manifest larger than the agent accepts is refused by the CLI before it is sent.
    let huge = format!("# {}\n", "x".repeat(4 << 20));
    let out = node.try_apply(&huge);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("larger than the 3145728 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And an ordinary apply still works.
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: x}\nspec:\n  podSelector: {}\n",
    );
}
