//! Bounds on what a manifest may make the parser do, checked by one linear pass before any
//! YAML parsing: the YAML parser's time grows much faster than linearly with the nesting of
//! flow collections (200 KB of `[[[[...` took 36 s to reject), so depth is measured first.
//!
//! The pass is deliberately simple and errs only towards the limits: it counts brackets
//! outside quoted scalars and comments, and indentation levels, without parsing YAML.

use super::error::Problem;

/// Largest manifest accepted, in bytes. A policy of 10,000 CIDR peers is about 300 KB.
pub const MAX_MANIFEST_BYTES: usize = 3 << 20;
/// Deepest nesting of collections (flow brackets, or block indentation levels). Real
/// policies nest about a dozen levels deep.
pub const MAX_NESTING_DEPTH: usize = 64;
/// Most documents in one manifest.
pub const MAX_DOCUMENTS: usize = 10_000;

/// Where a limit was exceeded: the problem and the 1-based document it is in.
pub(crate) struct Exceeded {
    pub document: usize,
    pub problem: Problem,
}

/// Checks the limits in one pass over `yaml`.
pub(crate) fn check(yaml: &str) -> Result<(), Exceeded> {
    if yaml.len() > MAX_MANIFEST_BYTES {
        return Err(Exceeded {
            document: 1,
            problem: Problem::TooLarge {
                bytes: yaml.len(),
                limit: MAX_MANIFEST_BYTES,
            },
        });
    }
    let mut document = 1;
    let mut seen_content = false;
    let mut flow_depth = 0usize;
    // Indentation of the enclosing block levels, innermost last.
    let mut indents: Vec<usize> = Vec::new();
    for (index, line) in yaml.lines().enumerate() {
        let number = index + 1;
        let too_deep = |document| Exceeded {
            document,
            problem: Problem::TooDeep {
                line: number,
                limit: MAX_NESTING_DEPTH,
            },
        };
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            if seen_content {
                document += 1;
                if document > MAX_DOCUMENTS {
                    return Err(Exceeded {
                        document,
                        problem: Problem::TooManyDocuments {
                            limit: MAX_DOCUMENTS,
                        },
                    });
                }
            }
            seen_content = false;
            indents.clear();
            flow_depth = 0;
            continue;
        }
        let trimmed = line.trim_start_matches(' ');
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        seen_content = true;
        if flow_depth == 0 {
            // Block structure: each deeper indentation, and each `- ` that opens a sequence
            // item on this line, is one more level.
            let indent = line.len() - trimmed.len();
            while indents.last().is_some_and(|i| *i > indent) {
                indents.pop();
            }
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
            let mut rest = trimmed;
            let mut dashes = 0;
            while let Some(r) = rest.strip_prefix("- ") {
                dashes += 1;
                rest = r.trim_start_matches(' ');
            }
            if indents.len() + dashes > MAX_NESTING_DEPTH {
                return Err(too_deep(document));
            }
        }
        flow_depth = scan_flow(line, flow_depth).ok_or_else(|| too_deep(document))?;
    }
    Ok(())
}

/// The flow-collection depth after `line`, starting at `depth`; None past the limit.
fn scan_flow(line: &str, mut depth: usize) -> Option<usize> {
    let mut quote: Option<u8> = None;
    let mut previous = b' ';
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(b'"') if c == b'\\' => i += 1,
            Some(q) if c == q => {
                // A doubled single quote is an escaped quote inside a single-quoted scalar.
                if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                    i += 1;
                } else {
                    quote = None;
                }
            }
            Some(_) => {}
            None => match c {
                b'#' if previous == b' ' || previous == b'\t' => return Some(depth),
                b'"' | b'\'' => quote = Some(c),
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_NESTING_DEPTH {
                        return None;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        previous = c;
        i += 1;
    }
    Some(depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(yaml: &str) -> Option<String> {
        check(yaml)
            .err()
            .map(|e| format!("{} {}", e.document, e.problem))
    }

    #[test]
    fn ordinary_manifests_pass() {
        let yaml = "apiVersion: v1\nkind: NetworkPolicy\nspec:\n  podSelector: {matchLabels: {app: \"a[\"}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: '10.0.0.0/8', except: ['10.1.0.0/16']}\n# a comment with [[[[\n---\nkind: x\n";
        assert_eq!(problem(yaml), None);
    }

    #[test]
    fn deep_flow_nesting_is_refused_at_once() {
        let yaml = format!(
            "spec:\n  podSelector: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let started = std::time::Instant::now();
        let p = problem(&yaml).expect("refused");
        assert!(
            p.contains("nested more than 64 levels deep (line 2)"),
            "{p}"
        );
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let mut yaml = String::from("spec:\n");
        for i in 0..70 {
            yaml.push_str(&" ".repeat(2 * i + 2));
            yaml.push_str("a:\n");
        }
        assert!(problem(&yaml).unwrap().contains("nested more than 64"));
        let dashes = format!("spec: x\nlist:\n{}x\n", "- ".repeat(70));
        assert!(problem(&dashes).unwrap().contains("nested more than 64"));
    }

    #[test]
    fn brackets_in_quotes_and_comments_do_not_count() {
        let yaml = format!(
            "a: \"{}\"\nb: '{}'\nc: x # {}\n",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100)
        );
        assert_eq!(problem(&yaml), None);
    }

    #[test]
    fn size_and_document_count_are_bounded() {
        let big = "a".repeat(MAX_MANIFEST_BYTES + 1);
        assert!(problem(&big).unwrap().contains("bytes, more than the"));
        let many = "a: 1\n---\n".repeat(MAX_DOCUMENTS + 1);
        let p = problem(&many).unwrap();
        assert!(
            p.starts_with("10001 ") && p.contains("more than 10000 documents"),
            "{p}"
        );
        // Empty documents between markers do not count.
        assert_eq!(problem(&"---\n".repeat(MAX_DOCUMENTS * 2)), None);
    }
}
