//! `kubectl-palisade` as the real kubectl finds and runs it: listed by `kubectl plugin list`,
//! `kubectl palisade --help` and `kubectl palisade status` (against a stand-in agent socket
//! that answers one status request) behave as `palisade` does.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::JoinHandle;

use palisade_api::types::{CounterView, StatusView};

/// A directory holding only the plugin (a link to the built binary), removed on drop.
struct PluginDir(PathBuf);

impl PluginDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("palisade-kubectl-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_kubectl-palisade"),
            dir.join("kubectl-palisade"),
        )
        .unwrap();
        PluginDir(dir)
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The directory of the real kubectl; the test fails when there is none, since a skipped
/// check would prove nothing.
fn kubectl_dir() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join("kubectl").is_file()))
        .expect("kubectl is not on PATH; this test runs the plugin through the real kubectl")
}

/// kubectl with PATH = the plugin directory, then kubectl's own (so no other plugin of this
/// machine is found), and a kubeconfig that names no cluster.
fn kubectl(plugins: &PluginDir, args: &[&str]) -> Output {
    let path = std::env::join_paths([plugins.0.clone(), kubectl_dir()]).unwrap();
    Command::new(kubectl_dir().join("kubectl"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &plugins.0)
        .env("KUBECONFIG", plugins.0.join("no-kubeconfig"))
        .output()
        .expect("kubectl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn kubectl_plugin_list_finds_it() {
    let plugins = PluginDir::new("list");
    let out = kubectl(&plugins, &["plugin", "list"]);
    let stdout = text(&out.stdout);
    let listed = plugins.0.join("kubectl-palisade");
    assert!(
        stdout.lines().any(|l| Path::new(l.trim()) == listed),
        "kubectl plugin list: {stdout}{}",
        text(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubectl plugin list warns: {}",
        text(&out.stderr)
    );
}

#[test]
fn kubectl_palisade_help_runs_the_cli_under_its_plugin_name() {
    let plugins = PluginDir::new("help");
    let out = kubectl(&plugins, &["palisade", "--help"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("Usage: kubectl palisade [OPTIONS] <COMMAND>"),
        "{stdout}"
    );
    for command in ["status", "observe", "policy", "endpoint"] {
        assert!(stdout.contains(command), "{command} in {stdout}");
    }
    let out = kubectl(&plugins, &["palisade", "observe", "--help"]);
    assert!(
        text(&out.stdout).contains("--pod <[NS/]POD>"),
        "{}",
        text(&out.stdout)
    );
}

/// Answers one request on `socket` with `status`, returning the request line it got.
fn serve_status_once(socket: &Path, status: &StatusView) -> JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    let body = serde_json::to_vec(status).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        // The headers; the request has no body.
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(&body).unwrap();
        request_line.trim_end().to_string()
    })
}

#[test]
fn kubectl_palisade_status_talks_to_the_agent() {
    let plugins = PluginDir::new("status");
    let socket = plugins.0.join("agent.sock");
    let status = StatusView {
        version: "0.1.0".into(),
        mode: "kubernetes".into(),
        node_ip: "10.244.1.1".parse().unwrap(),
        pod_cidr: "10.244.1.0/24".into(),
        enforcement: "default".into(),
        endpoints: 7,
        identities: 5,
        policies: 3,
        policy_map_entries: 42,
        ipcache_entries: 12,
        maps_in_sync: true,
        conntrack_entries: 9,
        flows_stored: 100,
        counters: vec![CounterView {
            direction: "ingress".into(),
            outcome: "FORWARDED".into(),
            packets: 10,
            bytes: 600,
        }],
        namespaces: std::collections::BTreeMap::default(),
        audit: palisade_api::types::AuditView::default(),
    };
    let agent = serve_status_once(&socket, &status);
    let api = socket.display().to_string();
    let out = kubectl(&plugins, &["palisade", "--api", &api, "status"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(
        agent.join().unwrap(),
        "GET http://palisade/v1/status HTTP/1.1"
    );
    assert!(
        stdout.starts_with("Palisade 0.1.0 (kubernetes mode)"),
        "{stdout}"
    );
    assert!(stdout.contains("(pod CIDR 10.244.1.0/24)"), "{stdout}");
    assert!(stdout.contains("in sync"), "{stdout}");

    // And its failures are palisade's: one line, a non-zero exit, through kubectl.
    std::fs::remove_file(&socket).unwrap();
    let out = kubectl(&plugins, &["palisade", "--api", &api, "status"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("palisade: the palisade agent is not running"),
        "{stderr}"
    );
}
