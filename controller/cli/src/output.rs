//! Plain-text tables for humans; `-o json` prints the API's own JSON shapes instead.

use std::fmt::Write as _;

/// Left-aligned columns separated by two spaces, header first.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                // Writing into a String cannot fail.
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(headers.to_vec())];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let t = table(
            &["NAME", "IP"],
            &[
                vec!["frontend".into(), "10.0.0.2".into()],
                vec!["db".into(), "10.0.0.3".into()],
            ],
        );
        assert_eq!(t, "NAME      IP\nfrontend  10.0.0.2\ndb        10.0.0.3");
    }
}
