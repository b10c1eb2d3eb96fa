//! The Kubernetes API stand-in, driven by the real kubectl and by kube-rs: everything over
//! real HTTP on loopback, or inside network namespaces the tests create.
#![expect(
    clippy::print_stderr,
    reason = "a failing kubectl call prints what it said for whoever reads the test log"
)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use palisade_integration::kube_api::{self, ApiServer, Config, Fault, PauseMode};
use serde_json::{Value, json};

static FILES: AtomicU32 = AtomicU32::new(0);

/// A manifest written to a temp file for `kubectl -f`, removed when dropped.
struct Manifest(PathBuf);

impl std::ops::Deref for Manifest {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Manifest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn manifest(text: &str) -> Manifest {
    let n = FILES.fetch_add(1, Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!(
        "palisade-kube-api-test-{}-{n}.yaml",
        std::process::id()
    ));
    std::fs::write(&p, text).expect("write manifest");
    Manifest(p)
}

fn run(mut cmd: Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    eprintln!(
        "{cmd:?}\n  -> {}\n  stdout: {}\n  stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn kubectl(api: &ApiServer, args: &[&str]) -> Output {
    let mut cmd = api.kubectl(api.addr(), None);
    cmd.args(args);
    run(cmd)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "kubectl should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).expect("kubectl printed JSON")
}

const NETPOL: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-ingress
  namespace: default
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - ports:
    - port: 80
";

const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.palisade.io
spec:
  group: example.palisade.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Color, type: string, jsonPath: .spec.color}
    - {name: Valid, type: string, jsonPath: '.status.conditions[?(@.type=="Valid")].status'}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [color]
            properties:
              color: {type: string, enum: [red, blue]}
              size: {type: integer, default: 1}
          status:
            type: object
            properties:
              conditions:
                type: array
                items:
                  type: object
                  properties:
                    type: {type: string}
                    status: {type: string}
"#;

const WIDGET: &str = "apiVersion: example.palisade.io/v1
kind: Widget
metadata:
  name: w1
  namespace: default
spec:
  color: red
  unknown: dropped
";

#[test]
fn kubectl_creates_replaces_gets_and_deletes_a_network_policy() {
    let api = ApiServer::start();
    let file = manifest(NETPOL);
    let f = file.to_str().unwrap();
    // kubectl's default --validate=strict: it reads /openapi/v3, then sends
    // fieldValidation=Strict and leaves validation to the server.
    ok(&kubectl(&api, &["create", "-f", f]));
    let err = failed(&kubectl(&api, &["create", "-f", f]));
    assert!(
        err.contains("Error from server (AlreadyExists)")
            && err.contains("networkpolicies.networking.k8s.io \"web-ingress\" already exists"),
        "{err}"
    );
    let got = json_of(&kubectl(
        &api,
        &["get", "networkpolicy", "web-ingress", "-o", "json"],
    ));
    assert_eq!(got["metadata"]["generation"], 1);
    assert!(!got["metadata"]["uid"].as_str().unwrap().is_empty());
    // Defaults, as the real server applies them.
    assert_eq!(got["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(got["spec"]["ingress"][0]["ports"][0]["protocol"], "TCP");

    let table = ok(&kubectl(&api, &["get", "netpol"]));
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "POD-SELECTOR", "AGE"]);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("web-ingress   app=web"),
        "{table}"
    );

    let changed = manifest(&NETPOL.replace("port: 80", "port: 8080"));
    ok(&kubectl(
        &api,
        &["replace", "-f", changed.to_str().unwrap()],
    ));
    let got = json_of(&kubectl(
        &api,
        &["get", "netpol", "web-ingress", "-o", "json"],
    ));
    assert_eq!(got["spec"]["ingress"][0]["ports"][0]["port"], 8080);
    assert_eq!(
        got["metadata"]["generation"], 2,
        "a spec change bumps the generation"
    );

    let out = ok(&kubectl(&api, &["delete", "-f", f]));
    assert!(
        out.contains("networkpolicy.networking.k8s.io \"web-ingress\" deleted"),
        "{out}"
    );
    let err = failed(&kubectl(&api, &["get", "netpol", "web-ingress"]));
    assert!(
        err.contains("Error from server (NotFound): networkpolicies.networking.k8s.io \"web-ingress\" not found"),
        "{err}"
    );
}

#[test]
fn kubectl_apply_creates_patches_and_is_checked_by_the_server() {
    let api = ApiServer::start();
    let file = manifest(NETPOL);
    let f = file.to_str().unwrap();
    let out = ok(&kubectl(&api, &["apply", "-f", f]));
    assert!(
        out.contains("networkpolicy.networking.k8s.io/web-ingress created"),
        "{out}"
    );
    let rv = |api: &ApiServer| {
        api.get(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "default",
            "web-ingress",
        )
        .unwrap()["metadata"]["resourceVersion"]
            .clone()
    };
    let before = rv(&api);
    ok(&kubectl(&api, &["apply", "-f", f]));
    assert_eq!(
        rv(&api),
        before,
        "applying the same manifest writes nothing"
    );

    // A strategic merge patch computed by kubectl from its last-applied annotation.
    let changed = manifest(&NETPOL.replace("port: 80", "port: 8443"));
    let out = ok(&kubectl(&api, &["apply", "-f", changed.to_str().unwrap()]));
    assert!(out.contains("configured"), "{out}");
    let got = api
        .get(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "default",
            "web-ingress",
        )
        .unwrap();
    assert_eq!(
        got["spec"]["ingress"][0]["ports"],
        json!([{"port": 8443, "protocol": "TCP"}])
    );
    assert_eq!(got["metadata"]["generation"], 2);
    assert!(
        got["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );

    let bogus = manifest(&NETPOL.replace("    - port: 80", "    - port: 80\n      bogus: 1"));
    let err = failed(&kubectl(&api, &["apply", "-f", bogus.to_str().unwrap()]));
    assert!(
        err.contains("strict decoding error: unknown field \"spec.ingress[0].ports[0].bogus\""),
        "{err}"
    );

    let out = ok(&kubectl(
        &api,
        &["apply", "--server-side", "--force-conflicts", "-f", f],
    ));
    assert!(out.contains("serverside-applied"), "{out}");
    let got = api
        .get(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "default",
            "web-ingress",
        )
        .unwrap();
    assert_eq!(got["spec"]["ingress"][0]["ports"][0]["port"], 80);

    ok(&kubectl(
        &api,
        &["label", "netpol", "web-ingress", "tier=edge"],
    ));
    ok(&kubectl(
        &api,
        &["annotate", "netpol", "web-ingress", "note=x"],
    ));
    let got = api
        .get(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "default",
            "web-ingress",
        )
        .unwrap();
    assert_eq!(got["metadata"]["labels"]["tier"], "edge");
    assert_eq!(got["metadata"]["annotations"]["note"], "x");
    // Server-side dry run, which `kubectl diff` uses, changes nothing.
    let before = rv(&api);
    let diff = kubectl(&api, &["diff", "-f", changed.to_str().unwrap()]);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "kubectl diff exits 1 when there are differences"
    );
    assert!(
        String::from_utf8_lossy(&diff.stdout)
            .lines()
            .any(|l| l.starts_with('+') && l.contains("port: 8443")),
        "the diff shows the change"
    );
    assert_eq!(rv(&api), before);
}

#[test]
fn kubectl_typed_create_commands_send_protobuf_the_server_decodes() {
    let api = ApiServer::start();
    for args in [
        &["create", "namespace", "shop"][..],
        &[
            "create",
            "configmap",
            "cfg",
            "-n",
            "shop",
            "--from-literal=a=1",
        ],
        &["create", "serviceaccount", "palisade", "-n", "shop"],
        &[
            "create",
            "clusterrole",
            "reader",
            "--verb=get,list,watch",
            "--resource=pods",
        ],
        &[
            "create",
            "clusterrolebinding",
            "reader",
            "--clusterrole=reader",
            "--serviceaccount=shop:palisade",
        ],
        &[
            "create",
            "service",
            "clusterip",
            "web",
            "-n",
            "shop",
            "--tcp=80:8080",
        ],
        &[
            "run",
            "p",
            "--image=busybox:1.36",
            "-n",
            "shop",
            "--labels=app=p",
        ],
    ] {
        ok(&kubectl(&api, args));
    }
    let ns = api.get("v1", "Namespace", "", "shop").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "shop"
    );
    assert!(
        ns["metadata"].get("generateName").is_none(),
        "empty protobuf fields are not kept"
    );
    assert_eq!(
        api.get("v1", "ConfigMap", "shop", "cfg").unwrap()["data"],
        json!({"a": "1"})
    );
    let crb = api
        .get(
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            "",
            "reader",
        )
        .unwrap();
    assert_eq!(
        crb["subjects"],
        json!([{"kind": "ServiceAccount", "name": "palisade", "namespace": "shop"}])
    );
    assert_eq!(crb["roleRef"]["name"], "reader");
    let rules = api
        .get("rbac.authorization.k8s.io/v1", "ClusterRole", "", "reader")
        .unwrap()["rules"]
        .clone();
    assert_eq!(
        rules,
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let svc = api.get("v1", "Service", "shop", "web").unwrap();
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
    let services = ok(&kubectl(&api, &["get", "svc", "-A", "-o", "name"]));
    assert_eq!(
        services.lines().collect::<Vec<_>>(),
        ["service/kubernetes", "service/web"],
        "the apiserver's own Service is there"
    );
    let pod = api.get("v1", "Pod", "shop", "p").unwrap();
    assert_eq!(pod["status"]["phase"], "Pending");
    let table = ok(&kubectl(&api, &["get", "pods", "-n", "shop", "-o", "wide"]));
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header[..6],
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP"]
    );
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("p      0/1     Pending"),
        "{table}"
    );
}

#[test]
fn kubectl_1_32_works_too() {
    // /usr/bin/kubectl dispatches to the release matching the server (1.33 here); the 1.32
    // client, which the project targets, is run directly.
    let k132 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32";
    assert!(std::path::Path::new(k132).exists(), "{k132} is missing");
    let api = ApiServer::start();
    let file = manifest(NETPOL);
    let mut cmd = api.kubectl(api.addr(), None);
    let args: Vec<std::ffi::OsString> = cmd.get_args().map(std::ffi::OsStr::to_os_string).collect();
    cmd = Command::new(k132);
    cmd.args(&args)
        .args(["create", "-f", file.to_str().unwrap()]);
    ok(&run(cmd));
    let mut get = Command::new(k132);
    get.args(&args).args(["get", "netpol", "-o", "name"]);
    assert_eq!(
        ok(&run(get)).trim(),
        "networkpolicy.networking.k8s.io/web-ingress"
    );
}

#[test]
fn kubectl_manages_namespaces() {
    let api = ApiServer::start();
    let file =
        manifest("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {team: a}\n");
    ok(&kubectl(
        &api,
        &["create", "-f", file.to_str().unwrap(), "--validate=false"],
    ));
    let ns = json_of(&kubectl(&api, &["get", "namespace", "shop", "-o", "json"]));
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "shop"
    );
    assert_eq!(ns["status"]["phase"], "Active");
    let table = ok(&kubectl(&api, &["get", "ns", "shop"]));
    assert!(
        table.lines().nth(1).unwrap().starts_with("shop   Active"),
        "{table}"
    );
    let names = ok(&kubectl(&api, &["get", "ns", "-l", "team=a", "-o", "name"]));
    assert_eq!(names.trim(), "namespace/shop");

    // Content of a namespace goes with it.
    api.create(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "shop"}}))
        .unwrap();
    let missing = api
        .create(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "nowhere"}}))
        .unwrap_err();
    assert_eq!(missing.message, "namespaces \"nowhere\" not found");
    ok(&kubectl(&api, &["delete", "-f", file.to_str().unwrap()]));
    assert!(api.get("v1", "ConfigMap", "shop", "c").is_none());
    assert!(api.get("v1", "Namespace", "", "shop").is_none());
}

#[test]
fn a_crd_serves_its_resource_with_printer_columns_and_status() {
    let api = ApiServer::start();
    let crd = manifest(CRD);
    ok(&kubectl(
        &api,
        &["create", "-f", crd.to_str().unwrap(), "--validate=false"],
    ));
    let got = json_of(&kubectl(
        &api,
        &["get", "crd", "widgets.example.palisade.io", "-o", "json"],
    ));
    let established = got["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True");
    assert!(established, "{got}");
    ok(&kubectl(
        &api,
        &[
            "wait",
            "--for=condition=Established",
            "crd/widgets.example.palisade.io",
            "--timeout=10s",
        ],
    ));

    // Unknown fields: refused under fieldValidation=Strict, warned about under Warn (kubectl's
    // --validate=false asks for Ignore).
    let body = serde_json::to_string(&serde_norway::from_str::<Value>(WIDGET).unwrap()).unwrap();
    let url = format!(
        "{}/apis/example.palisade.io/v1/namespaces/default/widgets",
        ApiServer::url(api.addr())
    );
    let strict = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data",
        &body,
        &format!("{url}?fieldValidation=Strict"),
    ]);
    assert_eq!(strict["code"], 400, "{strict}");
    assert_eq!(
        strict["message"],
        "strict decoding error: unknown field \"spec.unknown\""
    );
    let warned = run({
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "-i",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data",
            &body,
            &format!("{url}?dryRun=All"),
        ]);
        c
    });
    let text = String::from_utf8_lossy(&warned.stdout).to_lowercase();
    assert!(
        text.contains("warning: 299 - \"unknown field \\\"spec.unknown\\\"\""),
        "{text}"
    );
    assert!(
        api.list("example.palisade.io/v1", "Widget").is_empty(),
        "a dry run stores nothing"
    );
    let w = manifest(WIDGET);
    let err = failed(&kubectl(&api, &["create", "-f", w.to_str().unwrap()]));
    assert!(
        err.contains("strict decoding error: unknown field \"spec.unknown\""),
        "{err}"
    );
    ok(&kubectl(
        &api,
        &["create", "-f", w.to_str().unwrap(), "--validate=false"],
    ));
    let obj = json_of(&kubectl(&api, &["get", "widget", "w1", "-o", "json"]));
    assert_eq!(
        obj["spec"],
        json!({"color": "red", "size": 1}),
        "pruned and defaulted"
    );
    assert_eq!(obj["metadata"]["generation"], 1);

    // The schema is enforced.
    let bad = manifest(
        &WIDGET
            .replace("name: w1", "name: w2")
            .replace("color: red", "color: green"),
    );
    let err = failed(&kubectl(
        &api,
        &["create", "-f", bad.to_str().unwrap(), "--validate=false"],
    ));
    assert!(
        err.contains("Unsupported value: \"green\": supported values: \"red\", \"blue\""),
        "{err}"
    );

    // Status through the subresource only; the printer column follows it.
    let status =
        json!({"status": {"conditions": [{"type": "Valid", "status": "True"}]}}).to_string();
    ok(&kubectl(
        &api,
        &[
            "patch",
            "widget",
            "w1",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ],
    ));
    let table = ok(&kubectl(&api, &["get", "wd"]));
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "COLOR", "VALID", "AGE"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["w1", "red", "True"], "{table}");
    let obj = json_of(&kubectl(&api, &["get", "widget", "w1", "-o", "json"]));
    assert_eq!(
        obj["metadata"]["generation"], 1,
        "a status write leaves the generation"
    );
    // A main-resource write cannot change the status.
    let main = json!({"spec": {"color": "blue"}, "status": {"conditions": []}}).to_string();
    ok(&kubectl(
        &api,
        &["patch", "widget", "w1", "--type=merge", "-p", &main],
    ));
    let obj = json_of(&kubectl(&api, &["get", "widget", "w1", "-o", "json"]));
    assert_eq!(obj["status"]["conditions"][0]["status"], "True");
    assert_eq!(obj["metadata"]["generation"], 2);

    // Deleting the CRD removes its objects and its resource.
    ok(&kubectl(&api, &["delete", "-f", crd.to_str().unwrap()]));
    assert!(api.list("example.palisade.io/v1", "Widget").is_empty());
    let err = failed(&kubectl(&api, &["get", "widgets"]));
    // kubectl answers from its discovery cache (then the list gets the real 404) or from fresh
    // discovery, depending on its cache: both say the resource is gone.
    assert!(
        err.contains("the server could not find the requested resource")
            || err.contains("the server doesn't have a resource type \"widgets\""),
        "{err}"
    );
}

/// A request with curl; its JSON answer.
fn curl(args: &[&str]) -> Value {
    let mut c = Command::new("curl");
    c.arg("-sS").args(args);
    let out = run(c);
    serde_json::from_slice(&out.stdout).expect("a JSON answer")
}

#[test]
fn kubectl_get_watch_streams_changes() {
    let api = ApiServer::start();
    let np: Value = serde_norway::from_str(NETPOL).unwrap();
    api.create(&np).unwrap();
    let mut cmd = api.kubectl(api.addr(), None);
    // The default (Table) output: watch events are Tables too, and only the first carries
    // the column definitions.
    cmd.args(["get", "netpol", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("kubectl get -w");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |want: &[&str]| {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {want:?} line"));
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&words[..want.len()], want, "{line}");
    };
    next(&["EVENT", "NAME", "POD-SELECTOR", "AGE"]);
    next(&["ADDED", "web-ingress", "app=web"]);
    let mut changed = np.clone();
    changed["metadata"]["labels"] = json!({"x": "y"});
    api.upsert(&changed);
    next(&["MODIFIED", "web-ingress", "app=web"]);
    api.remove(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "default",
        "web-ingress",
    );
    next(&["DELETED", "web-ingress", "app=web"]);
    child.kill().expect("stop kubectl");
    let _ = child.wait();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn pod(name: &str, node: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox:1.36"}]}})
}

/// The next watcher event that is not an init marker, within a deadline.
async fn next_event<S>(stream: &mut S) -> watcher::Event<Pod>
where
    S: futures::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watcher event in time")
            .expect("the stream goes on");
        match ev {
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Ok(e) => return e,
            Err(e) => eprintln!("watcher error (it retries): {e}"),
        }
    }
}

fn applied_name(e: &watcher::Event<Pod>) -> (&'static str, String) {
    match e {
        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
            ("apply", p.metadata.name.clone().unwrap_or_default())
        }
        watcher::Event::Delete(p) => ("delete", p.metadata.name.clone().unwrap_or_default()),
        watcher::Event::Init | watcher::Event::InitDone => ("init", String::new()),
    }
}

#[test]
fn kube_rs_watcher_follows_changes_survives_drops_and_relists_after_gone() {
    let api = ApiServer::with_config(Config {
        bookmark_interval: Duration::from_millis(300),
        ..Config::default()
    });
    let addr = api.listen();
    api.upsert(&pod("a", "n1", "web"));
    rt().block_on(async {
        let client = api.client(addr).await;
        let pods: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().fields("spec.nodeName=n1");
        let mut stream = watcher::watcher(pods, cfg).boxed();
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "a".to_string())
        );

        api.upsert(&pod("b", "n1", "web"));
        api.upsert(&pod("other-node", "n2", "web"));
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "b".to_string())
        );
        api.remove("v1", "Pod", "default", "b");
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("delete", "b".to_string())
        );

        // A dropped connection: the watcher re-watches from where it was and misses nothing.
        wait_until_async(|| api.open_watches() == 1).await;
        assert_eq!(api.drop_watches(), 1);
        api.upsert(&pod("c", "n1", "web"));
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "c".to_string())
        );

        // Bookmarks keep the watcher's resourceVersion current; after a compaction its next
        // watch from an older one gets 410 Gone and it lists again.
        let before = api.requests().of("list", "pods");
        wait_until_async(|| api.open_watches() == 1).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        api.upsert(&pod("other-node-2", "n2", "web"));
        api.compact();
        api.drop_watches();
        api.upsert(&pod("d", "n1", "web"));
        let mut seen = Vec::new();
        while !seen.contains(&("apply", "d".to_string())) {
            seen.push(applied_name(&next_event(&mut stream).await));
        }
        assert!(
            api.requests().of("list", "pods") > before,
            "the watcher listed again after 410 Gone"
        );
        for name in ["a", "c"] {
            assert!(
                seen.contains(&("apply", name.to_string())),
                "relist shows {name}: {seen:?}"
            );
        }
    });
}

async fn wait_until_async(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn watches_from_a_compacted_resource_version_get_410_gone() {
    let api = ApiServer::start();
    let addr = api.listen();
    let old = api.resource_version();
    api.upsert(&pod("a", "n1", "web"));
    api.compact();
    let now = api.resource_version();
    let out = run({
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "-N",
            &format!(
                "{}/api/v1/namespaces/default/pods?watch=1&resourceVersion={old}",
                ApiServer::url(addr)
            ),
        ]);
        c
    });
    let line: Value = serde_json::from_slice(&out.stdout).expect("one JSON event");
    assert_eq!(
        line,
        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {old} ({now})"), "reason": "Expired", "code": 410}})
    );
}

#[test]
fn streaming_list_watcher_gets_initial_events_and_the_end_bookmark() {
    let api = ApiServer::start();
    let addr = api.listen();
    api.upsert(&pod("a", "n1", "web"));
    api.upsert(&pod("b", "n1", "web"));
    rt().block_on(async {
        let pods: Api<Pod> = Api::namespaced(api.client(addr).await, "default");
        let mut stream =
            watcher::watcher(pods, watcher::Config::default().streaming_lists()).boxed();
        let mut init = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
            {
                watcher::Event::InitApply(p) => init.push(p.metadata.name.unwrap()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        assert_eq!(init, ["a", "b"]);
        api.upsert(&pod("c", "n1", "web"));
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "c".to_string())
        );
    });
    assert_eq!(
        api.requests().of("list", "pods"),
        0,
        "a streaming list lists nothing"
    );
}

#[test]
fn lists_paginate_over_a_consistent_snapshot() {
    let api = ApiServer::start();
    let addr = api.listen();
    for i in 0..5 {
        api.upsert(&pod(&format!("p{i}"), "n1", "web"));
    }
    rt().block_on(async {
        let pods: Api<Pod> = Api::namespaced(api.client(addr).await, "default");
        let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
        assert_eq!(first.items.len(), 2);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        let token = first.metadata.continue_.clone().unwrap();
        // Changes after the first page do not show in later pages.
        api.upsert(&pod("p00", "n1", "web"));
        api.remove("v1", "Pod", "default", "p4");
        let second = pods
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap();
        let names: Vec<String> = second
            .items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["p2", "p3"]);
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );
        let third = pods
            .list(
                &ListParams::default()
                    .limit(2)
                    .continue_token(second.metadata.continue_.as_ref().unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(third.items[0].metadata.name.as_deref(), Some("p4"));
        assert!(third.metadata.continue_.is_none());

        // A continue token from before a compaction is expired.
        api.compact();
        let err = pods
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err();
        let kube::Error::Api(status) = err else {
            panic!("{err}")
        };
        assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        let all = pods.list(&ListParams::default()).await.unwrap();
        assert_eq!(all.items.len(), 5);
    });
}

#[test]
fn selectors_filter_lists_and_watches() {
    let api = ApiServer::start();
    let addr = api.listen();
    api.upsert(&pod("web-1", "n1", "web"));
    api.upsert(&pod("db-1", "n2", "db"));
    rt().block_on(async {
        let pods: Api<Pod> = Api::all(api.client(addr).await);
        let names = |l: kube::core::ObjectList<Pod>| -> Vec<String> {
            l.items
                .into_iter()
                .map(|p| p.metadata.name.unwrap())
                .collect()
        };
        assert_eq!(
            names(
                pods.list(&ListParams::default().labels("app in (web,x)"))
                    .await
                    .unwrap()
            ),
            ["web-1"]
        );
        assert_eq!(
            names(
                pods.list(&ListParams::default().fields("spec.nodeName=n2"))
                    .await
                    .unwrap()
            ),
            ["db-1"]
        );
        assert_eq!(
            names(
                pods.list(
                    &ListParams::default()
                        .labels("app!=web")
                        .fields("metadata.namespace=default")
                )
                .await
                .unwrap()
            ),
            ["db-1"]
        );
        let err = pods
            .list(&ListParams::default().fields("spec.bogus=1"))
            .await
            .unwrap_err();
        let kube::Error::Api(s) = err else { panic!() };
        assert_eq!(
            (s.code, s.message.as_str()),
            (400, "field label not supported: spec.bogus")
        );

        // A pod that stops matching is DELETED for the watch, one that starts is ADDED.
        let mut stream =
            watcher::watcher(pods.clone(), watcher::Config::default().labels("app=web")).boxed();
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "web-1".to_string())
        );
        api.upsert(&pod("web-1", "n1", "retired"));
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("delete", "web-1".to_string())
        );
        api.upsert(&pod("db-1", "n2", "web"));
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "db-1".to_string())
        );
    });
}

#[test]
fn updates_are_optimistic_and_status_is_a_subresource() {
    let api = ApiServer::start();
    let addr = api.listen();
    rt().block_on(async {
        let client = api.client(addr).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let mut p: Pod = serde_json::from_value(pod("a", "n1", "web")).unwrap();
        p.status = Some(serde_json::from_value(json!({"phase": "Running"})).unwrap());
        let created = pods.create(&PostParams::default(), &p).await.unwrap();
        assert_eq!(created.status.as_ref().unwrap().phase.as_deref(), Some("Pending"), "create resets status");
        assert_eq!(created.metadata.generation, Some(1));

        let mut stale = created.clone();
        let mut fresh = created.clone();
        fresh.metadata.labels.as_mut().unwrap().insert("v".into(), "2".into());
        let updated = pods.replace("a", &PostParams::default(), &fresh).await.unwrap();
        assert_ne!(updated.metadata.resource_version, created.metadata.resource_version);
        stale.metadata.labels.as_mut().unwrap().insert("v".into(), "3".into());
        let err = pods.replace("a", &PostParams::default(), &stale).await.unwrap_err();
        let kube::Error::Api(s) = err else { panic!() };
        assert_eq!(s.code, 409);
        assert_eq!(s.reason, "Conflict");
        assert_eq!(s.message, "Operation cannot be fulfilled on pods \"a\": the object has been modified; please apply your changes to the latest version and try again");

        // Server-side apply of the status, as kube-rs controllers write it.
        let status = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running", "podIP": "10.0.0.5"}});
        let after = pods.patch_status("a", &PatchParams::apply("palisade-test"), &Patch::Apply(&status)).await.unwrap();
        assert_eq!(after.status.as_ref().unwrap().pod_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(after.metadata.generation, Some(1));
        // A main write carrying a status changes the labels, not the status.
        let main = json!({"metadata": {"labels": {"v": "4"}}, "status": {"phase": "Failed"}});
        let after = pods.patch("a", &PatchParams::default(), &Patch::Merge(&main)).await.unwrap();
        assert_eq!(after.status.unwrap().phase.as_deref(), Some("Running"));
        assert_eq!(after.metadata.labels.unwrap()["v"], "4");

        let err = pods.get("missing").await.unwrap_err();
        let kube::Error::Api(s) = err else { panic!() };
        assert_eq!((s.code, s.message.as_str(), s.reason.as_str()), (404, "pods \"missing\" not found", "NotFound"));

        // Apply creates what is absent.
        let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), "default");
        let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "applied"}, "spec": {"podSelector": {}}});
        nps.patch("applied", &PatchParams::apply("palisade-test"), &Patch::Apply(&np)).await.unwrap();
        assert!(api.get("networking.k8s.io/v1", "NetworkPolicy", "default", "applied").is_some());

        // generateName.
        let nss: Api<Namespace> = Api::all(client);
        let made = nss
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).unwrap())
            .await
            .unwrap();
        let name = made.metadata.name.unwrap();
        assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
        nss.delete(&name, &DeleteParams::default()).await.unwrap();
    });
}

#[test]
fn injected_forbidden_reads_as_rbac_denies_and_requests_are_counted() {
    let api = ApiServer::start();
    let addr = api.listen();
    let id = api.inject(Fault::forbidden(
        "system:serviceaccount:palisade:palisade",
        "list",
        "",
        "pods",
    ));
    rt().block_on(async {
        let pods: Api<Pod> = Api::all(api.client(addr).await);
        let err = pods.list(&ListParams::default()).await.unwrap_err();
        let kube::Error::Api(s) = err else { panic!() };
        assert_eq!(s.code, 403);
        assert_eq!(s.reason, "Forbidden");
        assert_eq!(
            s.message,
            "pods is forbidden: User \"system:serviceaccount:palisade:palisade\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
        );
        api.remove_fault(id);
        pods.list(&ListParams::default()).await.unwrap();
    });
    let counts = api.requests();
    assert_eq!(counts.of("list", "pods"), 2);
    assert_eq!(counts.verb("watch"), 0);
}

#[test]
fn injected_latency_and_dropped_connections() {
    let api = ApiServer::start();
    let addr = api.listen();
    rt().block_on(async {
        let nss: Api<Namespace> = Api::all(api.client(addr).await);
        let slow =
            api.inject(Fault::delay("get", "", "namespaces", Duration::from_millis(400)).times(1));
        let t = Instant::now();
        nss.get("default").await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "served after the delay"
        );
        api.remove_fault(slow);

        let id = api.inject(Fault::drop_connection("list", "", "namespaces").times(1));
        let err = nss.list(&ListParams::default()).await.unwrap_err();
        assert!(
            !matches!(err, kube::Error::Api(_)),
            "a transport error, not a Status: {err}"
        );
        // Only once: the next request is served.
        assert_eq!(
            nss.list(&ListParams::default()).await.unwrap().items.len(),
            4
        );
        api.remove_fault(id);
        // A status fault for any verb of a resource, a given number of times: kube-rs
        // retries 429s by itself, and the request counts show the attempts.
        api.inject(
            Fault::status(
                "*",
                "",
                "namespaces",
                kube_api::ApiError::new(
                    429,
                    "TooManyRequests",
                    "the server has received too many requests and has asked us to try again later",
                ),
            )
            .times(2),
        );
        api.reset_requests();
        nss.get("default").await.unwrap();
        assert_eq!(api.requests().of("get", "namespaces"), 3);
    });
}

#[test]
fn kubectl_reaches_the_same_store_from_two_node_namespaces() {
    palisade_integration::require_root();
    let api = ApiServer::start();
    let tag = format!("ka{}", std::process::id() % 100_000);
    let nets = [format!("{tag}-n1"), format!("{tag}-n2")];
    let _guard = Netns::create(&nets);
    let addrs: Vec<SocketAddr> = nets.iter().map(|n| api.listen_in_netns(n)).collect();
    let file = manifest(NETPOL);
    let mut create = api.kubectl(addrs[0], Some(&nets[0]));
    create.args(["create", "-f", file.to_str().unwrap(), "--validate=false"]);
    ok(&run(create));
    let mut get = api.kubectl(addrs[1], Some(&nets[1]));
    get.args(["get", "netpol", "-o", "name"]);
    assert_eq!(
        ok(&run(get)).trim(),
        "networkpolicy.networking.k8s.io/web-ingress"
    );
    // The host's loopback is not the namespace's.
    let mut host = api.kubectl(addrs[1], None);
    host.args(["get", "netpol", "--request-timeout=2s"]);
    if addrs[1].port() != api.addr().port() {
        assert!(
            !run(host).status.success(),
            "a namespace listener is not reachable from the host"
        );
    }
}

/// Network namespaces with `lo` up, removed on drop.
struct Netns(Vec<String>);

impl Netns {
    fn create(names: &[String]) -> Netns {
        for n in names {
            let st = Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap();
            assert!(st.success(), "ip netns add {n}");
            let st = Command::new("ip")
                .args(["-n", n, "link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(st.success(), "lo up in {n}");
        }
        Netns(names.to_vec())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", n]).status();
        }
    }
}

#[test]
fn a_paused_server_refuses_then_comes_back_on_the_same_address() {
    let api = ApiServer::start();
    let addr = api.listen();
    rt().block_on(async {
        let client = api.client(addr).await;
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let mut stream = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();
        api.upsert(&pod("a", "n1", "web"));
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "a".to_string())
        );
        api.pause(PauseMode::Refuse);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "connections are refused"
        );
        assert!(pods.list(&ListParams::default()).await.is_err());
        api.upsert(&pod("b", "n1", "web"));
        api.resume();
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "b".to_string())
        );

        api.pause(PauseMode::Hang);
        let pending = tokio::spawn({
            let pods = pods.clone();
            async move { pods.get("a").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pending.is_finished(), "a hung server answers nothing");
        api.resume();
        assert!(pending.await.unwrap().is_ok());
    });
}

#[test]
fn events_of_both_groups_are_one_store() {
    let api = ApiServer::start();
    let addr = api.listen();
    rt().block_on(async {
        let client = api.client(addr).await;
        let reporter = kube::runtime::events::Reporter {
            controller: "palisade-test".into(),
            instance: Some("node-1".into()),
        };
        let recorder = kube::runtime::events::Recorder::new(client, reporter);
        let p: Pod = serde_json::from_value(api.upsert(&pod("a", "n1", "web"))).unwrap();
        for _ in 0..2 {
            recorder
                .publish(
                    &kube::runtime::events::Event {
                        type_: kube::runtime::events::EventType::Warning,
                        reason: "PolicyDenied".into(),
                        note: Some("denied 10.0.0.1:80".into()),
                        action: "Enforce".into(),
                        secondary: None,
                    },
                    &kube::Resource::object_ref(&p, &()),
                )
                .await
                .unwrap();
        }
    });
    let events = api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0]["series"]["count"], 2,
        "the second publish became a series"
    );
    assert_eq!(events[0]["reason"], "PolicyDenied");
    assert_eq!(events[0]["message"], "denied 10.0.0.1:80");
    assert_eq!(events[0]["involvedObject"]["name"], "a");
    assert_eq!(events[0]["reportingComponent"], "palisade-test");
    let table = ok(&kubectl(&api, &["get", "events"]));
    assert!(
        table.contains("PolicyDenied") && table.contains("pod/a"),
        "{table}"
    );
}

#[test]
fn finalizers_hold_a_deletion_until_they_are_removed() {
    let api = ApiServer::start();
    let addr = api.listen();
    rt().block_on(async {
        let client = api.client(addr).await;
        let nps: Api<NetworkPolicy> = Api::namespaced(client, "default");
        let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "held", "finalizers": ["palisade.io/cleanup"]}, "spec": {"podSelector": {}}});
        nps.create(&PostParams::default(), &serde_json::from_value(np).unwrap())
            .await
            .unwrap();
        let mut stream = watcher::watcher(nps.clone(), watcher::Config::default()).boxed();
        let first = next_np(&mut stream).await;
        assert!(matches!(first, watcher::Event::Apply(_) | watcher::Event::InitApply(_)));

        let answer = nps.delete("held", &DeleteParams::default()).await.unwrap();
        let marked = answer.left().expect("a held deletion answers with the object");
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert_eq!(marked.metadata.generation, Some(2), "marking for deletion bumps the generation");
        let watcher::Event::Apply(seen) = next_np(&mut stream).await else { panic!("a MODIFIED") };
        assert!(seen.metadata.deletion_timestamp.is_some());

        // kube-rs's finalizer helper removes its finalizer with a JSON patch guarded by `test`.
        let remove = json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "palisade.io/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]);
        let url = format!(
            "{}/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/held",
            ApiServer::url(addr)
        );
        let patched = curl(&[
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/json-patch+json",
            "--data",
            &remove.to_string(),
            &url,
        ]);
        assert_eq!(patched["metadata"]["name"], "held", "{patched}");
        // The same patch again fails its `test`, as the real server answers it.
        let again = curl(&[
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/json-patch+json",
            "--data",
            &remove.to_string(),
            &url,
        ]);
        assert_eq!(again["code"], 404, "{again}");
        // Patches that are not what they say get Status errors, never a dropped connection.
        let cm = format!("{}/api/v1/namespaces/default/configmaps", ApiServer::url(addr));
        api.create(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}}))
            .unwrap();
        for (ct, body, code) in [
            ("application/merge-patch+json", "\"x\"", 422),
            ("application/json-patch+json", "[{\"op\": \"replace\", \"path\": \"\", \"value\": 1}]", 422),
            ("application/json-patch+json", "{}", 400),
            ("application/merge-patch+json", "{not json", 400),
            ("text/plain", "{}", 415),
        ] {
            let got = curl(&["-X", "PATCH", "-H", &format!("Content-Type: {ct}"), "--data", body, &format!("{cm}/c")]);
            assert_eq!((got["kind"].as_str(), got["code"].as_i64()), (Some("Status"), Some(code)), "{ct} {body}: {got}");
        }
        let got = curl(&["-X", "POST", "-H", "Content-Type: application/json", "--data", "[1]", &cm]);
        assert_eq!(got["code"], 400, "{got}");
        let got = curl(&[&format!("{cm}?labelSelector=a%3Db%3Dc")]);
        assert_eq!(got["code"], 400, "{got}");
        assert!(matches!(
            next_np(&mut stream).await,
            watcher::Event::Delete(_)
        ));
        assert!(api.get("networking.k8s.io/v1", "NetworkPolicy", "default", "held").is_none());
    });
}

async fn next_np<S>(stream: &mut S) -> watcher::Event<NetworkPolicy>
where
    S: futures::Stream<Item = Result<watcher::Event<NetworkPolicy>, watcher::Error>> + Unpin,
{
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watcher event in time")
            .expect("the stream goes on")
            .expect("no watcher error");
        if !matches!(ev, watcher::Event::Init | watcher::Event::InitDone) {
            return ev;
        }
    }
}

#[test]
fn a_graceful_pod_delete_is_seen_as_terminating_then_deleted() {
    let api = ApiServer::start();
    let addr = api.listen();
    api.upsert(&pod("web", "n1", "web"));
    rt().block_on(async {
        let pods: Api<Pod> = Api::namespaced(api.client(addr).await, "default");
        let mut stream = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("apply", "web".to_string())
        );
        let answer = pods.delete("web", &DeleteParams::default()).await.unwrap();
        let terminating = answer
            .left()
            .expect("a graceful delete answers with the pod");
        assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
        let watcher::Event::Apply(p) = next_event(&mut stream).await else {
            panic!("a MODIFIED")
        };
        assert!(
            p.metadata.deletion_timestamp.is_some(),
            "first the pod is terminating"
        );
        assert_eq!(
            applied_name(&next_event(&mut stream).await),
            ("delete", "web".to_string())
        );
    });
}

#[test]
fn kube_rs_discovery_sees_crds_come_and_go() {
    let api = ApiServer::start();
    let addr = api.listen();
    rt().block_on(async {
        let client = api.client(addr).await;
        let info = client.apiserver_version().await.unwrap();
        assert_eq!((info.major.as_str(), info.minor.as_str()), ("1", "33"));
        let crd: Value = serde_norway::from_str(CRD).unwrap();
        api.create(&crd).unwrap();
        for aggregated in [false, true] {
            let d = kube::Discovery::new(client.clone());
            let d = if aggregated {
                d.run_aggregated().await
            } else {
                d.run().await
            }
            .unwrap();
            let group = d.get("example.palisade.io").unwrap_or_else(|| {
                panic!("the CRD's group is discovered (aggregated: {aggregated})")
            });
            let (ar, caps) = group
                .recommended_kind("Widget")
                .expect("Widget is discovered");
            assert_eq!(ar.plural, "widgets");
            assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
            assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
            assert!(
                caps.subresources
                    .iter()
                    .any(|(sub, _)| sub.plural == "widgets/status" || sub.plural == "status"),
                "the status subresource is discovered: {:?}",
                caps.subresources
            );
            let core = d.get("").expect("the core group");
            assert!(core.recommended_kind("Pod").is_some());
            let netpol = d
                .get("networking.k8s.io")
                .and_then(|g| g.recommended_kind("NetworkPolicy"));
            assert!(netpol.is_some());
        }
        api.remove(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "",
            "widgets.example.palisade.io",
        );
        let d = kube::Discovery::new(client.clone())
            .run_aggregated()
            .await
            .unwrap();
        assert!(
            d.get("example.palisade.io").is_none(),
            "a deleted CRD's group is gone"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_lives_inside_an_async_test() {
    let api = ApiServer::start();
    let addr = api.addr();
    let nss: Api<Namespace> = Api::all(api.client(addr).await);
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| n.metadata.name.unwrap())
        .collect();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"]
    );
    api.pause(PauseMode::Refuse);
    api.resume();
    nss.get("default").await.unwrap();
    drop(api);
}
