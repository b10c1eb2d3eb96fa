//! DNS messages as the proxy needs them: a client's query read and checked (one question,
//! a standard query, a name policy can judge), the REFUSED and SERVFAIL answers the proxy
//! makes itself, and a server's answer read back into the names and addresses it vouches
//! for. Pure functions over bytes; hickory-proto does the wire format, including the
//! compression pointers (a loop or a pointer forward is an error there, not a hang).

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use palisade_policies::fqdn::{NameError, normalize_name};

/// The largest DNS message over UDP the proxy takes (EDNS0 allows up to 4096 commonly; a
/// larger datagram is no DNS a client sends).
pub const MAX_UDP_MESSAGE: usize = 4096;
/// Over TCP the two-byte length bounds it.
pub const MAX_TCP_MESSAGE: usize = 65_535;
/// The most records of an answer the proxy reads; beyond it the answer is refused as a whole
/// (a server has no reason to send more, and each one costs the engine).
pub const MAX_ANSWER_RECORDS: usize = 256;
/// The longest CNAME chain followed.
pub const MAX_CNAME_CHAIN: usize = 16;

/// Why a message is not one the proxy passes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("the message is {0} bytes, more than the {MAX_UDP_MESSAGE} accepted")]
    TooLarge(usize),
    #[error("malformed DNS message: {0}")]
    Malformed(String),
    #[error("the message is a response where a query was expected")]
    NotAQuery,
    #[error("the message is a query where a response was expected")]
    NotAResponse,
    #[error("opcode {0} is not a standard query")]
    NotStandardQuery(u8),
    #[error("the message has {0} questions; exactly one is supported")]
    QuestionCount(usize),
    #[error("the question's name {name:?} cannot be judged: {why}")]
    BadName { name: String, why: NameError },
    #[error("the answer's id {got} is not the query's {expected}")]
    IdMismatch { got: u16, expected: u16 },
    #[error("the answer's question is not the query's")]
    QuestionMismatch,
    #[error("the answer holds {0} records, more than the {MAX_ANSWER_RECORDS} accepted")]
    TooManyRecords(usize),
    #[error("the answer could not be encoded: {0}")]
    Encode(String),
}

/// The one question of a client's query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Normalized: lower case, no trailing dot (`.` alone for the root).
    pub name: String,
    pub qtype: RecordType,
}

impl Question {
    /// The query type as DNS tools print it (`A`, `AAAA`, `TYPE65`...).
    pub fn type_name(&self) -> String {
        self.qtype.to_string()
    }
}

/// A query read and checked, with what the proxy needs to answer it itself.
#[derive(Clone, Debug)]
pub struct Query {
    pub question: Question,
    message: Message,
}

fn name_text(name: &Name) -> String {
    let text = name.to_ascii();
    if text == "." {
        text
    } else {
        text.trim_end_matches('.').to_ascii_lowercase()
    }
}

/// Reads a client's query: exactly one question, opcode QUERY, the QR bit clear, and a name
/// that policy can compare (every label made of DNS characters).
pub fn parse_query(bytes: &[u8]) -> Result<Query, DnsError> {
    if bytes.len() > MAX_UDP_MESSAGE {
        return Err(DnsError::TooLarge(bytes.len()));
    }
    let message = Message::from_vec(bytes).map_err(|e| DnsError::Malformed(e.to_string()))?;
    if message.metadata.message_type != MessageType::Query {
        return Err(DnsError::NotAQuery);
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(DnsError::NotStandardQuery(u8::from(
            message.metadata.op_code,
        )));
    }
    let [q] = message.queries.as_slice() else {
        return Err(DnsError::QuestionCount(message.queries.len()));
    };
    let raw = name_text(q.name());
    let name = if raw == "." {
        raw
    } else {
        normalize_name(&raw).map_err(|why| DnsError::BadName {
            name: raw.clone(),
            why,
        })?
    };
    Ok(Query {
        question: Question {
            id: message.metadata.id,
            name,
            qtype: q.query_type(),
        },
        message,
    })
}

impl Query {
    /// The answer the proxy gives itself: `rcode`, the question echoed, no records.
    pub fn reply(&self, rcode: ResponseCode) -> Result<Vec<u8>, DnsError> {
        let mut m = Message::error_msg(self.message.metadata.id, OpCode::Query, rcode);
        m.metadata.recursion_desired = self.message.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.add_queries(self.message.queries.iter().cloned());
        m.to_vec().map_err(|e| DnsError::Encode(e.to_string()))
    }

    /// REFUSED, as Cilium answers a query its DNS rules do not allow.
    pub fn refused(&self) -> Result<Vec<u8>, DnsError> {
        self.reply(ResponseCode::Refused)
    }

    /// SERVFAIL: the server did not answer, or its answer could not be used.
    pub fn servfail(&self) -> Result<Vec<u8>, DnsError> {
        self.reply(ResponseCode::ServFail)
    }
}

/// What a server's answer vouches for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The response code as DNS tools print it (`NoError`, `NXDomain`...).
    pub rcode: String,
    /// The question's name and the CNAME targets its chain leads to, normalized.
    pub names: Vec<String>,
    /// The IPv4 addresses of the A records owned by those names.
    pub addresses: Vec<Ipv4Addr>,
    /// The smallest TTL of those records and the CNAMEs on the way (0 without records).
    pub ttl: u32,
}

/// Reads a server's answer to `question`: a response with the query's id and question. Only
/// records on the chain from the question's name count: anything else in the answer
/// section (unrelated names a server slipped in) teaches nothing.
pub fn parse_answer(bytes: &[u8], question: &Question) -> Result<Answer, DnsError> {
    if bytes.len() > MAX_TCP_MESSAGE {
        return Err(DnsError::TooLarge(bytes.len()));
    }
    let message = Message::from_vec(bytes).map_err(|e| DnsError::Malformed(e.to_string()))?;
    if message.metadata.message_type != MessageType::Response {
        return Err(DnsError::NotAResponse);
    }
    if message.metadata.id != question.id {
        return Err(DnsError::IdMismatch {
            got: message.metadata.id,
            expected: question.id,
        });
    }
    match message.queries.as_slice() {
        [q] if name_text(q.name()) == question.name && q.query_type() == question.qtype => {}
        _ => return Err(DnsError::QuestionMismatch),
    }
    if message.answers.len() > MAX_ANSWER_RECORDS {
        return Err(DnsError::TooManyRecords(message.answers.len()));
    }
    let rcode = format!("{:?}", message.metadata.response_code);
    let mut names = vec![question.name.clone()];
    let mut ttl: Option<u32> = None;
    // Follow the CNAME chain, however the records are ordered.
    for _ in 0..MAX_CNAME_CHAIN {
        let current = names.last().cloned().unwrap_or_default();
        let next = message.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if name_text(&r.name) == current => {
                Some((name_text(&target.0), r.ttl))
            }
            _ => None,
        });
        match next {
            Some((target, t)) if !names.contains(&target) => {
                ttl = Some(ttl.map_or(t, |m| m.min(t)));
                names.push(target);
            }
            _ => break,
        }
    }
    let mut addresses = Vec::new();
    for r in &message.answers {
        if let RData::A(a) = &r.data
            && names.contains(&name_text(&r.name))
        {
            if !addresses.contains(&a.0) {
                addresses.push(a.0);
            }
            ttl = Some(ttl.map_or(r.ttl, |m| m.min(r.ttl)));
        }
    }
    // Names that are not valid DNS names (a CNAME to something odd) are not learned.
    names.retain(|n| normalize_name(n).is_ok());
    let ttl = if addresses.is_empty() {
        0
    } else {
        ttl.unwrap_or(0)
    };
    Ok(Answer {
        rcode,
        names,
        addresses,
        ttl,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::str::FromStr;

    use hickory_proto::op::Query as HQuery;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, CNAME};

    use super::*;

    pub(crate) fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_str(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    pub(crate) fn answer_bytes(id: u16, name: &str, records: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.add_query(HQuery::query(Name::from_str(name).unwrap(), RecordType::A));
        m.add_answers(records);
        m.to_vec().unwrap()
    }

    fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(Name::from_str(name).unwrap(), ttl, RData::A(A(ip.into())))
    }

    fn cname(name: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            ttl,
            RData::CNAME(CNAME(Name::from_str(target).unwrap())),
        )
    }

    #[test]
    fn a_query_is_read_and_its_name_normalized() {
        let q = parse_query(&query_bytes(7, "API.Example.TEST.", RecordType::A)).unwrap();
        assert_eq!(
            q.question,
            Question {
                id: 7,
                name: "api.example.test".into(),
                qtype: RecordType::A
            }
        );
        assert_eq!(q.question.type_name(), "A");
    }

    #[test]
    fn refused_echoes_the_question() {
        let q = parse_query(&query_bytes(9, "x.test.", RecordType::AAAA)).unwrap();
        let r = Message::from_vec(&q.refused().unwrap()).unwrap();
        assert_eq!(r.metadata.id, 9);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.queries.len(), 1);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn bad_queries_are_named() {
        assert!(matches!(parse_query(&[]), Err(DnsError::Malformed(_))));
        let q = query_bytes(1, "a.test.", RecordType::A);
        assert!(matches!(
            parse_query(&q[..q.len() - 3]),
            Err(DnsError::Malformed(_))
        ));
        assert_eq!(
            parse_query(&answer_bytes(1, "a.test.", vec![])).unwrap_err(),
            DnsError::NotAQuery
        );
        let mut none = Message::new(1, MessageType::Query, OpCode::Query);
        none.metadata.id = 1;
        assert_eq!(
            parse_query(&none.to_vec().unwrap()).unwrap_err(),
            DnsError::QuestionCount(0)
        );
        assert_eq!(
            parse_query(&vec![0; MAX_UDP_MESSAGE + 1]).unwrap_err(),
            DnsError::TooLarge(MAX_UDP_MESSAGE + 1)
        );
    }

    #[test]
    fn a_compression_loop_is_an_error_not_a_hang() {
        // Header: id 1, a query, one question; the name is a pointer to itself (offset 12).
        let mut m = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(parse_query(&m), Err(DnsError::Malformed(_))));
        // Two pointers to each other.
        let mut m = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(parse_query(&m), Err(DnsError::Malformed(_))));
    }

    #[test]
    fn a_wrong_count_is_an_error() {
        // Says two questions, holds one.
        let mut q = query_bytes(1, "a.test.", RecordType::A);
        q[5] = 2;
        assert!(matches!(parse_query(&q), Err(DnsError::Malformed(_))));
    }

    #[test]
    fn answers_follow_the_cname_chain_and_take_the_smallest_ttl() {
        let q = parse_query(&query_bytes(3, "www.example.test.", RecordType::A)).unwrap();
        let bytes = answer_bytes(
            3,
            "www.example.test.",
            vec![
                a("edge.cdn.test.", 300, [192, 0, 2, 1]),
                cname("www.example.test.", 60, "edge.cdn.test."),
                a("edge.cdn.test.", 120, [192, 0, 2, 2]),
                // Not on the chain: not learned.
                a("evil.test.", 300, [203, 0, 113, 9]),
            ],
        );
        let ans = parse_answer(&bytes, &q.question).unwrap();
        assert_eq!(ans.names, vec!["www.example.test", "edge.cdn.test"]);
        assert_eq!(
            ans.addresses,
            vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
        );
        assert_eq!(ans.ttl, 60);
        assert_eq!(ans.rcode, "NoError");
    }

    #[test]
    fn an_answer_to_another_question_is_refused() {
        let q = parse_query(&query_bytes(3, "a.test.", RecordType::A)).unwrap();
        assert_eq!(
            parse_answer(&answer_bytes(4, "a.test.", vec![]), &q.question).unwrap_err(),
            DnsError::IdMismatch {
                got: 4,
                expected: 3
            }
        );
        assert_eq!(
            parse_answer(&answer_bytes(3, "b.test.", vec![]), &q.question).unwrap_err(),
            DnsError::QuestionMismatch
        );
        assert_eq!(
            parse_answer(&query_bytes(3, "a.test.", RecordType::A), &q.question).unwrap_err(),
            DnsError::NotAResponse
        );
    }

    #[test]
    fn a_cname_loop_ends() {
        let q = parse_query(&query_bytes(3, "a.test.", RecordType::A)).unwrap();
        let bytes = answer_bytes(
            3,
            "a.test.",
            vec![
                cname("a.test.", 5, "b.test."),
                cname("b.test.", 5, "a.test."),
            ],
        );
        let ans = parse_answer(&bytes, &q.question).unwrap();
        assert_eq!(ans.names, vec!["a.test", "b.test"]);
        assert!(ans.addresses.is_empty());
        assert_eq!(ans.ttl, 0);
    }
}
