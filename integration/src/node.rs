//! A node namespace with its own agent.

use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Directory holding `palisade-agent` and `palisade`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("PALISADE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// `ip ARGS...`.
pub fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// An endpoint created through the CLI.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Full name, which is also its `ip netns` name.
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub id: u32,
    pub identity: u32,
}

impl Endpoint {
    /// `NS/NAME`, as trace and observe take it.
    pub fn qualified(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub struct Node {
    /// Node namespace name.
    pub netns: String,
    /// Unique prefix of everything this node creates.
    pub tag: String,
    pub dir: PathBuf,
    pub api: PathBuf,
    agent_args: Vec<String>,
    /// Run the agent in a mount namespace of its own where /sys/fs/bpf is not mounted, with
    /// its default `--bpffs` (what a fresh machine looks like).
    fresh_bpffs: bool,
    agent: Mutex<Option<Child>>,
    endpoints: Mutex<Vec<String>>,
}

impl Node {
    /// A fresh node namespace with an agent running in it.
    pub fn start(test: &str) -> Node {
        Self::start_with(test, &[])
    }

    pub fn start_with(test: &str, agent_args: &[&str]) -> Node {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // Short: endpoint names (tag-NAME) and their netns files must stay readable.
        let tag = format!("t{}{n}", std::process::id() % 100_000);
        Self::start_tagged(&tag, test, agent_args)
    }

    /// An agent with the default `--bpffs` (/sys/fs/bpf/palisade) in a mount namespace of its
    /// own in which /sys/fs/bpf is not mounted, as on a fresh machine; nothing it mounts is
    /// seen outside. Endpoints it creates are not visible to the host's `ip netns`.
    pub fn start_with_fresh_bpffs(test: &str) -> Node {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("t{}{n}", std::process::id() % 100_000);
        Self::make(&tag, test, &[], true)
    }

    /// Like `start_with`, with a chosen prefix for the namespaces it creates.
    pub fn start_tagged(tag: &str, test: &str, agent_args: &[&str]) -> Node {
        Self::make(tag, test, agent_args, false)
    }

    /// The node namespace and directory, the agent not started yet (`start_agent` starts it),
    /// for a test that must put something in the namespace first (an API server for a
    /// `--kubernetes` agent).
    pub fn prepare(test: &str, agent_args: &[&str]) -> Node {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("t{}{n}", std::process::id() % 100_000);
        Self::create(&tag, test, agent_args, false)
    }

    fn make(tag: &str, test: &str, agent_args: &[&str], fresh_bpffs: bool) -> Node {
        let node = Self::create(tag, test, agent_args, fresh_bpffs);
        node.start_agent();
        node
    }

    fn create(tag: &str, test: &str, agent_args: &[&str], fresh_bpffs: bool) -> Node {
        crate::require_root();
        let tag = tag.to_string();
        let netns = format!("{tag}-node");
        let dir = std::env::temp_dir().join(format!("palisade-it-{tag}-{test}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let out = ip(&["netns", "add", &netns]);
        assert!(
            out.status.success(),
            "ip netns add {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Node {
            api: dir.join("agent.sock"),
            netns,
            tag,
            dir,
            agent_args: agent_args
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            fresh_bpffs,
            agent: Mutex::new(None),
            endpoints: Mutex::new(Vec::new()),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the agent inside the node namespace (only the network namespace changes, so
    /// the namespaces it creates are visible to `ip netns`).
    pub fn start_agent(&self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("agent log");
        let mut cmd;
        if self.fresh_bpffs {
            // `exec` keeps the agent's pid that of the child, so stopping it stops the agent.
            cmd = Command::new("unshare");
            cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg("umount -l /sys/fs/bpf 2>/dev/null; exec \"$0\" \"$@\"")
                .arg("nsenter");
        } else {
            cmd = Command::new("nsenter");
        }
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(bin_dir().join("palisade-agent"));
        if !self.agent_args.iter().any(|a| a == "--kubernetes") {
            cmd.arg("--local");
        }
        cmd.arg("--api")
            .arg(&self.api)
            .arg("--state-dir")
            .arg(self.dir.join("state"));
        if !self.fresh_bpffs {
            cmd.arg("--bpffs").arg(self.dir.join("bpffs"));
        }
        cmd.args(&self.agent_args)
            .env(
                "PALISADE_LOG",
                "info,palisade_agent=debug,palisade_engine=debug,palisade_k8s=debug",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the agent: {e}"));
        *self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.palisade(&["status"]).status.success() {
                return;
            }
            // Take the answer out before panicking: the lock must not be held by a panic.
            let exited = self
                .agent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "the agent exited ({status}) during start:\n{}",
                    self.agent_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not come up:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The arguments the agent gets from its next start on.
    pub fn set_agent_args(&mut self, args: &[String]) {
        self.agent_args = args.to_vec();
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(Child::id)
    }

    /// Stops the agent with SIGTERM (as an operator or systemd would).
    pub fn stop_agent(&self) {
        if let Some(mut child) = self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in pid_t")),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the agent with SIGKILL (a crash: nothing is flushed).
    pub fn kill_agent(&self) {
        if let Some(mut child) = self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart_agent(&self) {
        self.stop_agent();
        self.start_agent();
    }

    /// Runs the CLI against this node's agent.
    pub fn palisade(&self, args: &[&str]) -> Output {
        run(Command::new(bin_dir().join("palisade"))
            .arg("--api")
            .arg(&self.api)
            .args(args))
    }

    /// Runs the CLI and returns stdout; panics with stderr and the agent log on failure.
    pub fn palisade_ok(&self, args: &[&str]) -> String {
        let out = self.palisade(args);
        assert!(
            out.status.success(),
            "palisade {args:?} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.palisade_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("palisade {args:?}: not JSON ({e}): {out}"))
    }

    /// Removes network namespace `name` with this node, when the test ends.
    pub fn track_netns(&self, name: &str) {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name.to_string());
    }

    /// The full (netns) name for a short endpoint name.
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.tag)
    }

    pub fn add_endpoint(&self, short: &str, namespace: &str, labels: &str) -> Endpoint {
        self.add_endpoint_with(short, namespace, labels, &[])
    }

    pub fn add_endpoint_with(
        &self,
        short: &str,
        namespace: &str,
        labels: &str,
        extra: &[&str],
    ) -> Endpoint {
        let name = self.name(short);
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name.clone());
        let mut args = vec![
            "endpoint",
            "add",
            &name,
            "--namespace",
            namespace,
            "--labels",
            labels,
        ];
        args.extend(extra);
        let v = self.json(&args);
        Endpoint {
            name,
            namespace: namespace.to_string(),
            ip: v["ip"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("ip in endpoint add output"),
            id: v["id"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .expect("id"),
            identity: v["identity"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .expect("identity"),
        }
    }

    /// Writes `yaml` to a file and applies it; returns the CLI output.
    pub fn try_apply(&self, yaml: &str) -> Output {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("policy-{n}.yaml"));
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(yaml.as_bytes()))
            .expect("write policy file");
        self.palisade(&["policy", "apply", "-f", path.to_str().expect("utf-8 path")])
    }

    pub fn apply(&self, yaml: &str) {
        let out = self.try_apply(yaml);
        assert!(
            out.status.success(),
            "policy apply failed: {}\n{yaml}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent_log()
        );
    }

    /// Newest flows as JSON objects.
    pub fn flows(&self, args: &[&str]) -> Vec<Value> {
        let mut a = vec!["observe", "-o", "json"];
        a.extend(args);
        self.palisade_ok(&a)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("flow line not JSON ({e}): {l}"))
            })
            .collect()
    }

    fn cleanup(&self) {
        self.stop_agent();
        let mut names: Vec<String> = self
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        // Also anything carrying our tag that a failed step left behind.
        if let Ok(rd) = fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("{}-", self.tag)) && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for n in names {
            let _ = ip(&["netns", "del", &n]);
        }
        let bpffs = self.dir.join("bpffs");
        let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent log ({}) ----\n{}", self.netns, self.agent_log());
        }
        self.cleanup();
    }
}
