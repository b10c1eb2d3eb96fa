//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), which kubectl's typed
//! commands send (`kubectl create namespace|configmap|serviceaccount|service|role|...`):
//! the `k8s\0` magic and `runtime.Unknown` envelope, then the object decoded by the field
//! table below into the JSON the rest of the server takes. Zero values are dropped, as the
//! real server's JSON encoding of the decoded Go struct drops them (`omitempty`). Kinds
//! outside the table are answered `415` (`kubectl run` sends JSON).

use serde_json::{Map, Value, json};

use super::util;

/// A field's type on the wire and in JSON.
#[derive(Clone, Copy, Debug)]
enum Ty {
    Str,
    I32,
    I64,
    Bool,
    Msg(&'static str),
    MapStr,
    MapBytes,
    /// `metav1.Time`: `{seconds, nanos}`, shown as RFC 3339.
    Time,
    /// `intstr.IntOrString`: `{type, intVal, strVal}`.
    IntOrString,
    /// `runtime.RawExtension` and `metav1.FieldsV1`: embedded JSON bytes.
    RawExtension,
}

struct Field {
    num: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

const fn f(num: u64, name: &'static str, ty: Ty, repeated: bool) -> Field {
    Field {
        num,
        name,
        ty,
        repeated,
    }
}

// The message table: field numbers, names and types of the messages these kinds reach,
// generated from k8s.io/api (core/v1, rbac/v1) and k8s.io/apimachinery (meta/v1) generated.proto.
static MESSAGES: &[(&str, &[Field])] = &[
    (
        "core.v1.ClientIPConfig",
        &[f(1, "timeoutSeconds", Ty::I32, false)],
    ),
    (
        "core.v1.ConfigMap",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "data", Ty::MapStr, false),
            f(3, "binaryData", Ty::MapBytes, false),
            f(4, "immutable", Ty::Bool, false),
        ],
    ),
    (
        "core.v1.LoadBalancerIngress",
        &[
            f(1, "ip", Ty::Str, false),
            f(2, "hostname", Ty::Str, false),
            f(3, "ipMode", Ty::Str, false),
            f(4, "ports", Ty::Msg("core.v1.PortStatus"), true),
        ],
    ),
    (
        "core.v1.LoadBalancerStatus",
        &[f(
            1,
            "ingress",
            Ty::Msg("core.v1.LoadBalancerIngress"),
            true,
        )],
    ),
    (
        "core.v1.LocalObjectReference",
        &[f(1, "name", Ty::Str, false)],
    ),
    (
        "core.v1.Namespace",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "spec", Ty::Msg("core.v1.NamespaceSpec"), false),
            f(3, "status", Ty::Msg("core.v1.NamespaceStatus"), false),
        ],
    ),
    (
        "core.v1.NamespaceCondition",
        &[
            f(1, "type", Ty::Str, false),
            f(2, "status", Ty::Str, false),
            f(4, "lastTransitionTime", Ty::Time, false),
            f(5, "reason", Ty::Str, false),
            f(6, "message", Ty::Str, false),
        ],
    ),
    (
        "core.v1.NamespaceSpec",
        &[f(1, "finalizers", Ty::Str, true)],
    ),
    (
        "core.v1.NamespaceStatus",
        &[
            f(1, "phase", Ty::Str, false),
            f(2, "conditions", Ty::Msg("core.v1.NamespaceCondition"), true),
        ],
    ),
    (
        "core.v1.ObjectReference",
        &[
            f(1, "kind", Ty::Str, false),
            f(2, "namespace", Ty::Str, false),
            f(3, "name", Ty::Str, false),
            f(4, "uid", Ty::Str, false),
            f(5, "apiVersion", Ty::Str, false),
            f(6, "resourceVersion", Ty::Str, false),
            f(7, "fieldPath", Ty::Str, false),
        ],
    ),
    (
        "core.v1.PortStatus",
        &[
            f(1, "port", Ty::I32, false),
            f(2, "protocol", Ty::Str, false),
            f(3, "error", Ty::Str, false),
        ],
    ),
    (
        "core.v1.Service",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "spec", Ty::Msg("core.v1.ServiceSpec"), false),
            f(3, "status", Ty::Msg("core.v1.ServiceStatus"), false),
        ],
    ),
    (
        "core.v1.ServiceAccount",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "secrets", Ty::Msg("core.v1.ObjectReference"), true),
            f(
                3,
                "imagePullSecrets",
                Ty::Msg("core.v1.LocalObjectReference"),
                true,
            ),
            f(4, "automountServiceAccountToken", Ty::Bool, false),
        ],
    ),
    (
        "core.v1.ServicePort",
        &[
            f(1, "name", Ty::Str, false),
            f(2, "protocol", Ty::Str, false),
            f(3, "port", Ty::I32, false),
            f(4, "targetPort", Ty::IntOrString, false),
            f(5, "nodePort", Ty::I32, false),
            f(6, "appProtocol", Ty::Str, false),
        ],
    ),
    (
        "core.v1.ServiceSpec",
        &[
            f(1, "ports", Ty::Msg("core.v1.ServicePort"), true),
            f(2, "selector", Ty::MapStr, false),
            f(3, "clusterIP", Ty::Str, false),
            f(4, "type", Ty::Str, false),
            f(5, "externalIPs", Ty::Str, true),
            f(7, "sessionAffinity", Ty::Str, false),
            f(8, "loadBalancerIP", Ty::Str, false),
            f(9, "loadBalancerSourceRanges", Ty::Str, true),
            f(10, "externalName", Ty::Str, false),
            f(11, "externalTrafficPolicy", Ty::Str, false),
            f(12, "healthCheckNodePort", Ty::I32, false),
            f(13, "publishNotReadyAddresses", Ty::Bool, false),
            f(
                14,
                "sessionAffinityConfig",
                Ty::Msg("core.v1.SessionAffinityConfig"),
                false,
            ),
            f(17, "ipFamilyPolicy", Ty::Str, false),
            f(18, "clusterIPs", Ty::Str, true),
            f(19, "ipFamilies", Ty::Str, true),
            f(20, "allocateLoadBalancerNodePorts", Ty::Bool, false),
            f(21, "loadBalancerClass", Ty::Str, false),
            f(22, "internalTrafficPolicy", Ty::Str, false),
            f(23, "trafficDistribution", Ty::Str, false),
        ],
    ),
    (
        "core.v1.ServiceStatus",
        &[
            f(
                1,
                "loadBalancer",
                Ty::Msg("core.v1.LoadBalancerStatus"),
                false,
            ),
            f(2, "conditions", Ty::Msg("meta.v1.Condition"), true),
        ],
    ),
    (
        "core.v1.SessionAffinityConfig",
        &[f(1, "clientIP", Ty::Msg("core.v1.ClientIPConfig"), false)],
    ),
    (
        "rbac.v1.AggregationRule",
        &[f(
            1,
            "clusterRoleSelectors",
            Ty::Msg("meta.v1.LabelSelector"),
            true,
        )],
    ),
    (
        "rbac.v1.ClusterRole",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "rules", Ty::Msg("rbac.v1.PolicyRule"), true),
            f(
                3,
                "aggregationRule",
                Ty::Msg("rbac.v1.AggregationRule"),
                false,
            ),
        ],
    ),
    (
        "rbac.v1.ClusterRoleBinding",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "subjects", Ty::Msg("rbac.v1.Subject"), true),
            f(3, "roleRef", Ty::Msg("rbac.v1.RoleRef"), false),
        ],
    ),
    (
        "rbac.v1.PolicyRule",
        &[
            f(1, "verbs", Ty::Str, true),
            f(2, "apiGroups", Ty::Str, true),
            f(3, "resources", Ty::Str, true),
            f(4, "resourceNames", Ty::Str, true),
            f(5, "nonResourceURLs", Ty::Str, true),
        ],
    ),
    (
        "rbac.v1.Role",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "rules", Ty::Msg("rbac.v1.PolicyRule"), true),
        ],
    ),
    (
        "rbac.v1.RoleBinding",
        &[
            f(1, "metadata", Ty::Msg("meta.v1.ObjectMeta"), false),
            f(2, "subjects", Ty::Msg("rbac.v1.Subject"), true),
            f(3, "roleRef", Ty::Msg("rbac.v1.RoleRef"), false),
        ],
    ),
    (
        "rbac.v1.RoleRef",
        &[
            f(1, "apiGroup", Ty::Str, false),
            f(2, "kind", Ty::Str, false),
            f(3, "name", Ty::Str, false),
        ],
    ),
    (
        "rbac.v1.Subject",
        &[
            f(1, "kind", Ty::Str, false),
            f(2, "apiGroup", Ty::Str, false),
            f(3, "name", Ty::Str, false),
            f(4, "namespace", Ty::Str, false),
        ],
    ),
    (
        "meta.v1.Condition",
        &[
            f(1, "type", Ty::Str, false),
            f(2, "status", Ty::Str, false),
            f(3, "observedGeneration", Ty::I64, false),
            f(4, "lastTransitionTime", Ty::Time, false),
            f(5, "reason", Ty::Str, false),
            f(6, "message", Ty::Str, false),
        ],
    ),
    (
        "meta.v1.DeleteOptions",
        &[
            f(1, "gracePeriodSeconds", Ty::I64, false),
            f(2, "preconditions", Ty::Msg("meta.v1.Preconditions"), false),
            f(3, "orphanDependents", Ty::Bool, false),
            f(4, "propagationPolicy", Ty::Str, false),
            f(5, "dryRun", Ty::Str, true),
            f(
                6,
                "ignoreStoreReadErrorWithClusterBreakingPotential",
                Ty::Bool,
                false,
            ),
        ],
    ),
    (
        "meta.v1.LabelSelector",
        &[
            f(1, "matchLabels", Ty::MapStr, false),
            f(
                2,
                "matchExpressions",
                Ty::Msg("meta.v1.LabelSelectorRequirement"),
                true,
            ),
        ],
    ),
    (
        "meta.v1.LabelSelectorRequirement",
        &[
            f(1, "key", Ty::Str, false),
            f(2, "operator", Ty::Str, false),
            f(3, "values", Ty::Str, true),
        ],
    ),
    (
        "meta.v1.ManagedFieldsEntry",
        &[
            f(1, "manager", Ty::Str, false),
            f(2, "operation", Ty::Str, false),
            f(3, "apiVersion", Ty::Str, false),
            f(4, "time", Ty::Time, false),
            f(6, "fieldsType", Ty::Str, false),
            f(7, "fieldsV1", Ty::RawExtension, false),
            f(8, "subresource", Ty::Str, false),
        ],
    ),
    (
        "meta.v1.ObjectMeta",
        &[
            f(1, "name", Ty::Str, false),
            f(2, "generateName", Ty::Str, false),
            f(3, "namespace", Ty::Str, false),
            f(4, "selfLink", Ty::Str, false),
            f(5, "uid", Ty::Str, false),
            f(6, "resourceVersion", Ty::Str, false),
            f(7, "generation", Ty::I64, false),
            f(8, "creationTimestamp", Ty::Time, false),
            f(9, "deletionTimestamp", Ty::Time, false),
            f(10, "deletionGracePeriodSeconds", Ty::I64, false),
            f(11, "labels", Ty::MapStr, false),
            f(12, "annotations", Ty::MapStr, false),
            f(
                13,
                "ownerReferences",
                Ty::Msg("meta.v1.OwnerReference"),
                true,
            ),
            f(14, "finalizers", Ty::Str, true),
            f(
                17,
                "managedFields",
                Ty::Msg("meta.v1.ManagedFieldsEntry"),
                true,
            ),
        ],
    ),
    (
        "meta.v1.OwnerReference",
        &[
            f(1, "kind", Ty::Str, false),
            f(3, "name", Ty::Str, false),
            f(4, "uid", Ty::Str, false),
            f(5, "apiVersion", Ty::Str, false),
            f(6, "controller", Ty::Bool, false),
            f(7, "blockOwnerDeletion", Ty::Bool, false),
        ],
    ),
    (
        "meta.v1.Preconditions",
        &[
            f(1, "uid", Ty::Str, false),
            f(2, "resourceVersion", Ty::Str, false),
        ],
    ),
];

/// The root message of each kind this server decodes from protobuf.
fn root(api_version: &str, kind: &str) -> Option<&'static str> {
    Some(match (api_version, kind) {
        ("v1", "Namespace") => "core.v1.Namespace",
        ("v1", "ConfigMap") => "core.v1.ConfigMap",
        ("v1", "ServiceAccount") => "core.v1.ServiceAccount",
        ("v1", "Service") => "core.v1.Service",
        ("v1" | "meta.k8s.io/v1", "DeleteOptions") => "meta.v1.DeleteOptions",
        ("rbac.authorization.k8s.io/v1", "Role") => "rbac.v1.Role",
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => "rbac.v1.ClusterRole",
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => "rbac.v1.RoleBinding",
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => "rbac.v1.ClusterRoleBinding",
        _ => return None,
    })
}

/// Why a protobuf body was not taken.
#[derive(Debug)]
pub enum ProtoError {
    /// Not a kind this server decodes from protobuf.
    Unsupported {
        api_version: String,
        kind: String,
    },
    Malformed(String),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| ProtoError::Malformed("unexpected end of a varint".into()))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Malformed(
            "a varint longer than 10 bytes".into(),
        ))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| ProtoError::Malformed("a length past the end of the message".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn bytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = usize::try_from(self.varint()?)
            .map_err(|_| ProtoError::Malformed("a length beyond memory".into()))?;
        self.take(n)
    }

    fn skip(&mut self, wire: u64) -> Result<(), ProtoError> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.take(8).map(|_| ()),
            2 => self.bytes().map(|_| ()),
            5 => self.take(4).map(|_| ()),
            w => Err(ProtoError::Malformed(format!("unsupported wire type {w}"))),
        }
    }

    /// The next field: its number, wire type, and (for length-delimited) its bytes.
    fn field(&mut self) -> Result<(u64, u64), ProtoError> {
        let key = self.varint()?;
        Ok((key >> 3, key & 7))
    }
}

fn utf8(b: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(b.to_vec())
        .map_err(|_| ProtoError::Malformed("a string that is not UTF-8".into()))
}

fn message_fields(name: &str) -> Result<&'static [Field], ProtoError> {
    MESSAGES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .ok_or_else(|| ProtoError::Malformed(format!("no message {name}")))
}

fn want(wire: u64, expected: u64, field: &Field) -> Result<(), ProtoError> {
    if wire == expected {
        Ok(())
    } else {
        Err(ProtoError::Malformed(format!(
            "proto: wrong wireType = {wire} for field {}",
            field.name
        )))
    }
}

fn timestamp(b: &[u8]) -> Result<Value, ProtoError> {
    let mut r = Reader::new(b);
    let (mut secs, mut nanos) = (0i64, 0i64);
    while !r.done() {
        match r.field()? {
            (1, 0) => secs = r.varint()?.cast_signed(),
            (2, 0) => nanos = r.varint()?.cast_signed(),
            (_, w) => r.skip(w)?,
        }
    }
    if secs == 0 && nanos == 0 {
        return Ok(Value::Null);
    }
    let t = k8s_openapi::jiff::Timestamp::new(secs, i32::try_from(nanos).unwrap_or(0))
        .map_err(|e| ProtoError::Malformed(format!("a timestamp out of range: {e}")))?;

    Ok(json!(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

fn scalar(r: &mut Reader<'_>, wire: u64, field: &Field) -> Result<Value, ProtoError> {
    Ok(match field.ty {
        Ty::Str => {
            want(wire, 2, field)?;
            json!(utf8(r.bytes()?)?)
        }
        Ty::I32 => {
            want(wire, 0, field)?;
            // Negative int32 values are sign-extended to 64 bits on the wire.
            json!(r.varint()?.cast_signed())
        }
        Ty::I64 => {
            want(wire, 0, field)?;
            json!(r.varint()?.cast_signed())
        }
        Ty::Bool => {
            want(wire, 0, field)?;
            json!(r.varint()? != 0)
        }
        Ty::Msg(name) => {
            want(wire, 2, field)?;
            Value::Object(message(name, r.bytes()?)?)
        }
        Ty::Time => {
            want(wire, 2, field)?;
            timestamp(r.bytes()?)?
        }
        Ty::IntOrString => {
            want(wire, 2, field)?;
            let mut inner = Reader::new(r.bytes()?);
            let (mut kind, mut int, mut s) = (0, 0i64, String::new());
            while !inner.done() {
                match inner.field()? {
                    (1, 0) => kind = inner.varint()?,
                    (2, 0) => int = inner.varint()?.cast_signed(),
                    (3, 2) => s = utf8(inner.bytes()?)?,
                    (_, w) => inner.skip(w)?,
                }
            }
            if kind == 1 { json!(s) } else { json!(int) }
        }
        Ty::RawExtension => {
            want(wire, 2, field)?;
            let mut inner = Reader::new(r.bytes()?);
            let mut raw: &[u8] = &[];
            while !inner.done() {
                match inner.field()? {
                    (1, 2) => raw = inner.bytes()?,
                    (_, w) => inner.skip(w)?,
                }
            }
            if raw.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(raw)
                    .map_err(|e| ProtoError::Malformed(format!("embedded JSON: {e}")))?
            }
        }
        Ty::MapStr | Ty::MapBytes => unreachable!("maps are decoded by their entries"),
    })
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

fn message(name: &str, buf: &[u8]) -> Result<Map<String, Value>, ProtoError> {
    let fields = message_fields(name)?;
    let mut out = Map::new();
    let mut r = Reader::new(buf);
    while !r.done() {
        let (num, wire) = r.field()?;
        let Some(field) = fields.iter().find(|f| f.num == num) else {
            r.skip(wire)?;
            continue;
        };
        match field.ty {
            Ty::MapStr | Ty::MapBytes => {
                want(wire, 2, field)?;
                let mut entry = Reader::new(r.bytes()?);
                let (mut k, mut v) = (String::new(), Value::String(String::new()));
                while !entry.done() {
                    match entry.field()? {
                        (1, 2) => k = utf8(entry.bytes()?)?,
                        (2, 2) => {
                            let b = entry.bytes()?;
                            v = if matches!(field.ty, Ty::MapStr) {
                                json!(utf8(b)?)
                            } else {
                                json!(util::base64_encode(b))
                            };
                        }
                        (_, w) => entry.skip(w)?,
                    }
                }
                let map = out.entry(field.name).or_insert_with(|| json!({}));
                map.as_object_mut().expect("made a map").insert(k, v);
            }
            _ if field.repeated => {
                let packed = wire == 2 && matches!(field.ty, Ty::I32 | Ty::I64 | Ty::Bool);
                let list = out.entry(field.name).or_insert_with(|| json!([]));
                let list = list.as_array_mut().expect("made a list");
                if packed {
                    let mut inner = Reader::new(r.bytes()?);
                    while !inner.done() {
                        list.push(scalar(&mut inner, 0, field)?);
                    }
                } else {
                    list.push(scalar(&mut r, wire, field)?);
                }
            }
            _ => {
                let v = scalar(&mut r, wire, field)?;
                if is_zero(&v) {
                    out.remove(field.name);
                } else {
                    out.insert(field.name.to_string(), v);
                }
            }
        }
    }
    Ok(out)
}

/// Decodes a protobuf request body into its JSON object.
pub fn decode(body: &[u8]) -> Result<Value, ProtoError> {
    let inner = body
        .strip_prefix(b"k8s\x00")
        .ok_or_else(|| ProtoError::Malformed("provided data does not appear to be a protobuf message, expected prefix [107 56 115 0]".into()))?;
    let mut r = Reader::new(inner);
    let (mut api_version, mut kind, mut raw): (String, String, &[u8]) =
        (String::new(), String::new(), &[]);
    while !r.done() {
        match r.field()? {
            (1, 2) => {
                let mut tm = Reader::new(r.bytes()?);
                while !tm.done() {
                    match tm.field()? {
                        (1, 2) => api_version = utf8(tm.bytes()?)?,
                        (2, 2) => kind = utf8(tm.bytes()?)?,
                        (_, w) => tm.skip(w)?,
                    }
                }
            }
            (2, 2) => raw = r.bytes()?,
            (_, w) => r.skip(w)?,
        }
    }
    let Some(name) = root(&api_version, &kind) else {
        return Err(ProtoError::Unsupported { api_version, kind });
    };
    let mut obj = message(name, raw)?;
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = u8::try_from(v & 0x7f).expect("7 bits");
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn ld(num: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    #[test]
    fn decodes_a_namespace_as_kubectl_sends_it() {
        // ObjectMeta: name "shop", empty generateName (gogo writes empty strings too), a label.
        let mut entry = Vec::new();
        ld(1, b"team", &mut entry);
        ld(2, b"a", &mut entry);
        let mut meta = Vec::new();
        ld(1, b"shop", &mut meta);
        ld(2, b"", &mut meta);
        ld(8, &[], &mut meta);
        ld(11, &entry, &mut meta);
        let mut ns = Vec::new();
        ld(1, &meta, &mut ns);
        ld(2, &[], &mut ns);
        let mut tm = Vec::new();
        ld(1, b"v1", &mut tm);
        ld(2, b"Namespace", &mut tm);
        let mut body = b"k8s\x00".to_vec();
        ld(1, &tm, &mut body);
        ld(2, &ns, &mut body);
        ld(3, b"", &mut body);
        ld(4, b"", &mut body);
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}, "spec": {}})
        );
    }

    #[test]
    fn other_kinds_are_unsupported() {
        let mut tm = Vec::new();
        ld(1, b"v1", &mut tm);
        ld(2, b"Pod", &mut tm);
        let mut body = b"k8s\x00".to_vec();
        ld(1, &tm, &mut body);
        assert!(matches!(decode(&body), Err(ProtoError::Unsupported { .. })));
        assert!(matches!(decode(b"{}"), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn every_referenced_message_is_in_the_table() {
        for (_, fields) in MESSAGES {
            for f in *fields {
                if let Ty::Msg(m) = f.ty {
                    assert!(message_fields(m).is_ok(), "{m}");
                }
            }
        }
    }
}
