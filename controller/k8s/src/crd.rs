//! Our custom resources: palisade.io/v1 NetworkPolicy, ClusterwideNetworkPolicy and
//! PalisadeIdentity.
//!
//! The policy kinds carry the CiliumNetworkPolicy rule language exactly as
//! `palisade_policies::manifest` parses it: every field the parser reads is modelled here with
//! its shape, and every Cilium field the parser names only to reject it
//! (`fromRequires`, `toServices`, `kafka`, ...) is kept as an opaque value
//! ([`Unsupported`]), so that the API server stores it and the agent can refuse the policy
//! (condition `Valid=False`) instead of the API server silently pruning a field that narrows
//! what a rule allows. The schema checks shapes only; what the values mean (CIDRs, regular
//! expressions, port names, protocols) is checked once, by the parser, and reported in the
//! policy's status. The tests in `tests/crd_manifests.rs` keep the two from drifting apart.
//!
//! Every type here accepts whatever the generated schema admits (integers are `i64`, as the
//! API server stores them), so one object written by a user can never make a typed list fail.
//!
//! `cargo xtask gen-crds` writes [`crd_files`] into `policies/crds/`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use kube::{CustomResource, CustomResourceExt as _};
use palisade_common::identity::{FIRST_LABEL_IDENTITY, LABEL_IDENTITY_END};
use palisade_policies::identity::Identity;
use palisade_policies::labels::Labels;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The API group of every Palisade resource.
pub const GROUP: &str = "palisade.io";
/// The one version of each of them.
pub const VERSION: &str = "v1";
/// The condition type a policy's status reports its validity under (the VALID column).
pub const VALID_CONDITION: &str = "Valid";

/// Both policy kinds share everything but their names, scope and descriptions: one macro
/// holds the derive (schema, printer columns, status), so the two cannot drift apart.
macro_rules! policy_kind {
    (
        $(#[doc = $doc:tt])*
        $spec:ident {
            kind: $kind:tt,
            singular: $singular:tt,
            plural: $plural:tt,
            shortnames: [$short:tt, $long:tt],
            description: $description:tt,
            scope: [$($scope:tt)?] $(,)?
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(
            CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq,
        )]
        #[kube(
            group = "palisade.io",
            version = "v1",
            kind = $kind,
            label("app.kubernetes.io/part-of", "palisade"),
            singular = $singular,
            plural = $plural,
            shortname = $short,
            shortname = $long,
            category = "palisade",
            $($scope,)?
            no_spec,
            status = "PolicyStatus",
            derive = "PartialEq",
            doc = $description,
            printcolumn(
                name = "Valid",
                type_ = "string",
                json_path = ".status.conditions[?(@.type==\"Valid\")].status",
                description = "Whether the agents accepted the policy"
            ),
            printcolumn(
                name = "Reason",
                type_ = "string",
                json_path = ".status.conditions[?(@.type==\"Valid\")].reason",
                description = "Why the policy is valid or not"
            ),
            printcolumn(
                name = "Message",
                type_ = "string",
                json_path = ".status.conditions[?(@.type==\"Valid\")].message",
                description = "The field and the problem, for a rejected policy",
                priority = 1
            ),
            printcolumn(
                name = "Age",
                type_ = "date",
                json_path = ".metadata.creationTimestamp"
            )
        )]
        #[serde(rename_all = "camelCase")]
        pub struct $spec {
            /// The policy's rule. A policy has `spec`, `specs`, or both.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub spec: Option<Rule>,
            /// More rules, each judged on its own, as in Cilium.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub specs: Option<Vec<Rule>>,
        }

        impl $spec {
            /// `spec`, then every entry of `specs`.
            pub fn rules(&self) -> impl Iterator<Item = &Rule> {
                self.spec.iter().chain(self.specs.iter().flatten())
            }
        }
    };
}

policy_kind! {
    /// A namespaced Palisade network policy: CiliumNetworkPolicy's rule language, with endpoint
    /// selectors kept inside the policy's namespace unless they name a namespace.
    NetworkPolicySpec {
        kind: "NetworkPolicy",
        singular: "palisadenetworkpolicy",
        plural: "palisadenetworkpolicies",
        shortnames: ["pnp", "palisadenp"],
        description: "A Palisade network policy (palisade.io/v1 NetworkPolicy): the CiliumNetworkPolicy rule language, namespaced.",
        scope: [namespaced],
    }
}

policy_kind! {
    /// A cluster-scoped Palisade network policy: the same rule language, with selectors that
    /// range over every namespace.
    ClusterwideNetworkPolicySpec {
        kind: "ClusterwideNetworkPolicy",
        singular: "palisadeclusterwidenetworkpolicy",
        plural: "palisadeclusterwidenetworkpolicies",
        shortnames: ["pcnp", "palisadecnp"],
        description: "A cluster-wide Palisade network policy (palisade.io/v1 ClusterwideNetworkPolicy): the CiliumNetworkPolicy rule language, selecting endpoints in every namespace.",
        scope: [],
    }
}

/// What the agents report about a policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Conditions, one per type; `Valid` says whether the policy was accepted and, if not,
    /// which field is wrong and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl PolicyStatus {
    /// The `Valid` condition, when an agent has reported one.
    pub fn valid(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == VALID_CONDITION)
    }
}

/// One rule (Cilium's `api.Rule`): the endpoints it selects, and what they may receive and send.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Free text, shown by `palisade policy list`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The endpoints this rule applies to (required). Keys may carry Cilium's `k8s:` or
    /// `any:` source prefix; `{}` selects every endpoint (of the namespace, for a namespaced
    /// policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_selector: Option<LabelSelector>,
    /// Cilium's host policies (a label selector over nodes); not supported by Palisade: a
    /// rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<Unsupported>,
    /// What the selected endpoints may receive. A non-empty list puts ingress in default deny.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// What the selected endpoints must never receive, whatever else allows it. A non-empty
    /// list puts ingress in default deny. No L7 rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<IngressRule>>,
    /// What the selected endpoints may send. A non-empty list puts egress in default deny.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    /// What the selected endpoints must never send, whatever else allows it. A non-empty list
    /// puts egress in default deny. No L7 rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<EgressRule>>,
    /// Cilium's rule labels; accepted and not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<RuleLabel>>,
    /// Overrides whether this rule puts each direction in default deny (by default it does
    /// for a direction it has rules for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDeny>,
    /// Palisade: the policy is in audit (as with the annotation `palisade.io/audit: "true"`):
    /// its verdicts are computed and what it would drop is forwarded and reported as an AUDIT
    /// flow naming its rule. Every rule of a policy that sets it must agree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<bool>,
}

/// `enableDefaultDeny`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DefaultDeny {
    /// Whether the selected endpoints deny ingress this policy does not allow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    /// Whether the selected endpoints deny egress this policy does not allow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// A label of a rule, as Cilium writes them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleLabel {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// An ingress (or ingressDeny) rule: peers it admits, on which ports. The peers are the union
/// of every `from*` field; with no peer field but with ports the rule covers every peer, and
/// `{}` covers none.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Endpoints by label; a namespaced policy's selectors stay in its namespace unless they
    /// name one with `io.kubernetes.pod.namespace`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<LabelSelector>>,
    /// Addresses or prefixes (`10.0.0.0/8`, `192.0.2.1`).
    #[serde(rename = "fromCIDR", skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<Vec<String>>,
    /// Prefixes with exceptions.
    #[serde(rename = "fromCIDRSet", skip_serializing_if = "Option::is_none")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    /// Cilium's entities: world, cluster, host, remote-node, kube-apiserver, init, health,
    /// unmanaged, ingress, all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<String>>,
    /// Ports (and HTTP rules); none means every port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    /// ICMP types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_requires: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_groups: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_nodes: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Unsupported>,
}

/// An egress (or egressDeny) rule: peers it may reach, on which ports. The peers are the
/// union of every `to*` field; with no peer field but with ports the rule covers every peer,
/// and `{}` covers none.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Endpoints by label; a namespaced policy's selectors stay in its namespace unless they
    /// name one with `io.kubernetes.pod.namespace`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<LabelSelector>>,
    /// Addresses or prefixes (`10.0.0.0/8`, `192.0.2.1`).
    #[serde(rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<String>>,
    /// Prefixes with exceptions.
    #[serde(rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    /// Cilium's entities: world, cluster, host, remote-node, kube-apiserver, init, health,
    /// unmanaged, ingress, all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<String>>,
    /// Ports (and HTTP rules); none means every port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    /// ICMP types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_requires: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_services: Option<Unsupported>,
    /// DNS names: the addresses the endpoint's own lookups of them returned, as long as the
    /// answer's TTL lasts (the lookups must pass a `rules.dns` rule to be seen).
    #[serde(rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_groups: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_nodes: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Unsupported>,
}

/// A prefix and the prefixes inside it it excludes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CidrRule {
    /// The prefix (required), or a single address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Prefixes strictly inside `cidr` that the rule does not cover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr_group_ref: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr_group_selector: Option<Unsupported>,
}

/// A `toPorts` entry: ports, and the HTTP rules requests to them must match.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// The ports; none means every port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortProtocol>>,
    /// L7 rules (HTTP only); the ports' connections then go through the agent's proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(rename = "terminatingTLS", skip_serializing_if = "Option::is_none")]
    pub terminating_tls: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(rename = "originatingTLS", skip_serializing_if = "Option::is_none")]
    pub originating_tls: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_names: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<Unsupported>,
}

/// A port, a port range or a named port, and its protocol.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// A port number (`"8080"` as Cilium writes it, or `8080`), a named container port
    /// (`http`), or absent, `""` or `"0"` for every port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// The last port of a range starting at `port` (numeric); 0 means no range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
    /// TCP, UDP, SCTP, ICMP or ANY (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// L7 rules of a `toPorts` entry. An empty `http` list allows every request.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct L7Rules {
    /// HTTP rules: a request is allowed when one of them matches it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRule>>,
    /// DNS rules (egress only): a lookup is answered when one of them matches its name, and
    /// refused otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<FqdnSelector>>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l7proto: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l7: Option<Unsupported>,
}

/// A DNS name or pattern, as Cilium's FQDNSelector: exactly one of the two fields.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FqdnSelector {
    /// A full name (`api.example.com`), case-insensitive, trailing dot optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    /// A name with `*` wildcards (`*.example.com`; `*` alone matches every name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

/// An HTTP rule: it matches a request when every field it names matches.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    /// Anchored regular expression over the method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Anchored regular expression over the normalized path, without the query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Anchored regular expression over the host, with or without its port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `Name` (the header must be present) or `Name: value` (it must have that value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
    /// Headers by name and value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_matches: Option<Vec<HeaderMatch>>,
    /// palisade.io only: protocols besides websocket a matching request may upgrade to
    /// (`spdy/3.1`); `h2c` is never honoured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrades: Option<Vec<String>>,
}

/// A header the request must carry.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    pub name: String,
    /// The exact value; absent means the header must merely be present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mismatch: Option<Unsupported>,
    /// Not supported by Palisade: a rule that sets it is rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Unsupported>,
}

/// An `icmps` entry.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IcmpRule {
    /// The ICMP types (at least one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<IcmpField>>,
}

/// One ICMP type.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IcmpField {
    /// A type number (0-255) or Cilium's name for it (EchoRequest, EchoReply,
    /// DestinationUnreachable, Redirect, TimeExceeded, ParameterProblem).
    #[serde(rename = "type")]
    pub icmp_type: IntOrString,
    /// IPv4 (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
}

/// A value that is an integer or a string (`x-kubernetes-int-or-string`). The integer is an
/// `i64`: the API server stores any integer, and a typed read must never fail on one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl Default for IntOrString {
    fn default() -> Self {
        IntOrString::String(String::new())
    }
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

impl JsonSchema for IntOrString {
    fn schema_name() -> Cow<'static, str> {
        "IntOrString".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "An integer or a string.",
            "x-kubernetes-int-or-string": true,
        })
    }
}

/// A Cilium field Palisade does not implement, kept whole (any JSON value) so that the agent
/// sees it and rejects the policy naming it, rather than the API server pruning it unseen.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(transparent)]
pub struct Unsupported(pub serde_json::Value);

impl JsonSchema for Unsupported {
    fn schema_name() -> Cow<'static, str> {
        "Unsupported".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Not supported by Palisade: a policy that sets it is rejected.",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }
}

/// A security identity allocated cluster-wide (as CiliumIdentity): the object's name is the
/// identity's number in decimal, its spec the full label set every endpoint with that
/// identity carries.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "palisade.io",
    version = "v1",
    kind = "PalisadeIdentity",
    label("app.kubernetes.io/part-of", "palisade"),
    singular = "palisadeidentity",
    plural = "palisadeidentities",
    shortname = "palisadeid",
    category = "palisade",
    derive = "PartialEq",
    doc = "A cluster-wide security identity (palisade.io/v1 PalisadeIdentity): its name is the identity number, its spec the labels of the endpoints that have it.",
    printcolumn(
        name = "Namespace",
        type_ = "string",
        json_path = ".spec.labels.io\\.kubernetes\\.pod\\.namespace",
        description = "The namespace of the endpoints with this identity"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PalisadeIdentitySpec {
    /// The identity's labels: the pod's labels (without rollout noise such as
    /// pod-template-hash), `io.kubernetes.pod.namespace`, and the namespace's labels under
    /// `io.cilium.k8s.namespace.labels.`.
    pub labels: BTreeMap<String, String>,
}

/// Why an object's name is not an identity number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityNameError {
    #[error("the PalisadeIdentity has no metadata.name")]
    Missing,
    #[error(
        "PalisadeIdentity name {name:?} is not an identity number (decimal digits, no leading zeros)"
    )]
    NotANumber { name: String },
    #[error(
        "PalisadeIdentity {id} is outside the label-derived identities ({FIRST_LABEL_IDENTITY} to {last})",
        last = LABEL_IDENTITY_END - 1
    )]
    OutOfScope { id: u32 },
}

impl PalisadeIdentity {
    /// The object for identity `id` with `labels`.
    pub fn for_identity(id: Identity, labels: Labels) -> Self {
        PalisadeIdentity {
            metadata: ObjectMeta {
                name: Some(id.0.to_string()),
                ..ObjectMeta::default()
            },
            spec: PalisadeIdentitySpec { labels },
        }
    }

    /// The identity number its name holds, which must be a label-derived one.
    pub fn identity(&self) -> Result<Identity, IdentityNameError> {
        let name = self
            .metadata
            .name
            .as_deref()
            .ok_or(IdentityNameError::Missing)?;
        let canonical = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_digit())
            && (name == "0" || !name.starts_with('0'));
        let id = canonical
            .then(|| name.parse::<u32>().ok())
            .flatten()
            .ok_or_else(|| IdentityNameError::NotANumber {
                name: name.to_string(),
            })?;
        if !(FIRST_LABEL_IDENTITY..LABEL_IDENTITY_END).contains(&id) {
            return Err(IdentityNameError::OutOfScope { id });
        }
        Ok(Identity(id))
    }
}

/// Every CustomResourceDefinition Palisade installs.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        NetworkPolicy::crd(),
        ClusterwideNetworkPolicy::crd(),
        PalisadeIdentity::crd(),
    ];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                let mut value = serde_json::to_value(&*schema)
                    .expect("a JSONSchemaProps is plain data and serializes");
                unwrap_descriptions(&mut value);
                *schema = serde_json::from_value(value)
                    .expect("only description strings changed, so the schema reads back");
            }
        }
    }
    crds
}

/// Doc comments arrive hard-wrapped; `kubectl explain` wraps descriptions itself, so the
/// lines of each paragraph are joined (paragraph breaks stay).
fn unwrap_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, sub) in map.iter_mut() {
                match sub {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = text
                            .split("\n\n")
                            .map(|paragraph| {
                                paragraph
                                    .split('\n')
                                    .map(str::trim)
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            })
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => unwrap_descriptions(sub),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// One generated file of `policies/crds/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrdFile {
    /// `<plural>.<group>.yaml`.
    pub file_name: String,
    pub contents: String,
}

/// Where the generated CRD files live, from the workspace root.
pub const CRD_DIR: &str = "policies/crds";

/// The command that writes [`crd_files`], for messages about stale files.
pub const GENERATE_COMMAND: &str = "cargo xtask gen-crds";

/// The first line of every generated file.
pub const GENERATED_HEADER: &str =
    "# Generated by `cargo xtask gen-crds` from controller/k8s/src/crd.rs: do not edit.";

#[derive(Debug, thiserror::Error)]
#[error("rendering the CustomResourceDefinition {name} as YAML: {source}")]
pub struct CrdRenderError {
    pub name: String,
    #[source]
    pub source: serde_norway::Error,
}

/// The YAML of every CRD, one file each, with a header saying where it comes from.
pub fn crd_files() -> Result<Vec<CrdFile>, CrdRenderError> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_norway::to_string(&crd).map_err(|source| CrdRenderError {
                name: name.clone(),
                source,
            })?;
            let kind = &crd.spec.names.kind;
            Ok(CrdFile {
                file_name: format!("{name}.yaml"),
                contents: format!(
                    "{GENERATED_HEADER}\n# {GROUP}/{VERSION} {kind}; install with `kubectl apply -f policies/crds/`.\n{yaml}"
                ),
            })
        })
        .collect()
}
