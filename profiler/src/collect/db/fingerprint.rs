//! Query fingerprints: literals → `?`, IN-lists collapsed, comments and extra whitespace
//! gone, keywords and identifiers as written. Every source's queries are grouped by them.

/// Longest fingerprint kept (in characters); longer ones end in `…`.
pub const FINGERPRINT_MAX: usize = 200;

/// The query with every literal (numbers, strings, `$n` parameters, booleans are kept as
/// words) replaced by `?`, lists of literals collapsed to one `?`, comments removed and
/// whitespace collapsed; keywords and identifiers as written.
pub fn fingerprint(sql: &str) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let mut tokens: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if c == '\'' || ((c == 'E' || c == 'e') && chars.get(i + 1) == Some(&'\'')) {
            // String literal; '' is an escaped quote.
            i += if c == '\'' { 1 } else { 2 };
            loop {
                match chars.get(i) {
                    None => break,
                    Some('\\') if c != '\'' => i += 2,
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            tokens.push("?".into());
        } else if c == '$' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
            i += 1;
            while chars.get(i).is_some_and(|d| d.is_ascii_digit()) {
                i += 1;
            }
            tokens.push("?".into());
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            while chars
                .get(i)
                .is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.')
            {
                i += 1;
            }
            // A sign right after an operator or "(" / "," belongs to the number.
            if tokens.last().is_some_and(|t| t == "-")
                && tokens
                    .len()
                    .checked_sub(2)
                    .and_then(|k| tokens.get(k))
                    .is_none_or(|t| is_operator_or_open(t))
            {
                tokens.pop();
            }
            tokens.push("?".into());
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while chars
                .get(i)
                .is_some_and(|d| d.is_alphanumeric() || *d == '_' || *d == '$')
            {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else if c == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            i += 1;
            tokens.push(chars[start..i.min(chars.len())].iter().collect());
        } else {
            // Operators: keep runs of symbol characters together (<=, ::, ->>).
            let start = i;
            i += 1;
            if !matches!(c, '(' | ')' | ',' | ';') {
                while chars
                    .get(i)
                    .is_some_and(|d| "<>=!~+-*/%^|&#@:".contains(*d))
                {
                    i += 1;
                }
            }
            tokens.push(chars[start..i].iter().collect());
        }
    }
    while tokens.last().is_some_and(|t| t == ";") {
        tokens.pop();
    }
    // Collapse "IN ( ? , ? , … )" to "IN ( ? )": lists of any length alike.
    let mut collapsed: Vec<String> = Vec::new();
    let mut k = 0;
    while k < tokens.len() {
        if tokens[k] == "(" && k > 0 && tokens[k - 1].eq_ignore_ascii_case("in") {
            let mut j = k + 1;
            let mut only_literals = true;
            let mut items = 0;
            while j < tokens.len() && tokens[j] != ")" {
                match tokens[j].as_str() {
                    "?" => items += 1,
                    "," => {}
                    _ => {
                        only_literals = false;
                        break;
                    }
                }
                j += 1;
            }
            if only_literals && items > 1 && j < tokens.len() {
                collapsed.extend(["(".into(), "?".into(), ")".into()]);
                k = j + 1;
                continue;
            }
        }
        collapsed.push(tokens[k].clone());
        k += 1;
    }
    let mut out = String::new();
    for (n, token) in collapsed.iter().enumerate() {
        let previous = n.checked_sub(1).map(|p| collapsed[p].as_str());
        let glue = matches!(token.as_str(), ")" | "," | ";" | "::" | ".")
            || matches!(previous, Some("(" | "::" | "."))
            || (token == "(" && previous.is_some_and(|p| p.chars().all(is_word_char)))
            || previous.is_none();
        if !glue {
            out.push(' ');
        }
        out.push_str(token);
    }
    if out.chars().count() > FINGERPRINT_MAX {
        out = out.chars().take(FINGERPRINT_MAX - 1).collect();
        out.push('…');
    }
    out
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_operator_or_open(token: &str) -> bool {
    !token.chars().any(is_word_char) && token != ")" && token != "?"
}

/// The statements of a MySQL multi-statement query, in order: `text` cut at each `;`
/// outside quotes (`'…'`, `"…"`, `` `…` ``, with `\` escapes and doubled quotes) and
/// comments (`-- …`, `# …`, `/* … */`), each trimmed; empty ones left out. A text that ends
/// mid-statement (cut at the probe's length) keeps its last part.
pub fn split_statements(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut statements = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < bytes.len() {
                    let escaped = bytes[i] == b'\\' && quote != b'`';
                    let doubled = bytes[i] == quote && bytes.get(i + 1) == Some(&quote);
                    if escaped || doubled {
                        i += 2;
                    } else if bytes[i] == quote {
                        break;
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b';' => {
                statements.push(text[start..i].trim());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    statements.push(text[start.min(text.len())..].trim());
    statements.retain(|s| !s.is_empty());
    statements
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_statement_text_is_cut_at_semicolons_outside_quotes_and_comments() {
        assert_eq!(
            split_statements("SELECT 1, SLEEP(0.002); SELECT 'a;b', \"c;\", `d;` ;\n"),
            ["SELECT 1, SLEEP(0.002)", "SELECT 'a;b', \"c;\", `d;`"]
        );
        assert_eq!(
            split_statements("SELECT 'it''s;', 'x\\';y' -- a;b\n; /* ; */ UPDATE t SET a = 1 # ;"),
            [
                "SELECT 'it''s;', 'x\\';y' -- a;b",
                "/* ; */ UPDATE t SET a = 1 # ;"
            ]
        );
        assert_eq!(split_statements("SELECT 1"), ["SELECT 1"]);
        assert_eq!(split_statements(" ; ;"), Vec::<&str>::new());
        // Cut mid-quote by the probe's length: the rest is one statement.
        assert_eq!(
            split_statements("SELECT 1; SELECT 'ab;c"),
            ["SELECT 1", "SELECT 'ab;c"]
        );
    }

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            fingerprint("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"),
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?"
        );
        assert_eq!(
            fingerprint("UPDATE pgbench_accounts SET abalance = abalance + -4215 WHERE aid = 77;"),
            "UPDATE pgbench_accounts SET abalance = abalance + ? WHERE aid = ?"
        );
        assert_eq!(
            fingerprint(
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 4, -10, CURRENT_TIMESTAMP);"
            ),
            "INSERT INTO pgbench_history(tid, bid, aid, delta, mtime) VALUES(?, ?, ?, ?, CURRENT_TIMESTAMP)"
        );
        assert_eq!(
            fingerprint("select * from t where name = 'O''Brien' and x = E'a\\'b' and y = 1.5e3"),
            "select * from t where name = ? and x = ? and y = ?"
        );
        assert_eq!(fingerprint("SELECT $1::int, $2"), "SELECT ?::int, ?");
        assert_eq!(fingerprint("SELECT a - 1 FROM t"), "SELECT a - ? FROM t");
    }

    #[test]
    fn in_lists_collapse_and_comments_and_whitespace_go() {
        let a = fingerprint("SELECT * FROM t WHERE id IN (1, 2, 3) -- three\n");
        let b = fingerprint("select /* hint */ *  FROM t\n WHERE id IN (7,8)");
        assert_eq!(a, "SELECT * FROM t WHERE id IN(?)");
        assert_eq!(b, "select * FROM t WHERE id IN(?)");
        assert_eq!(fingerprint("BEGIN;"), "BEGIN");
        assert_eq!(fingerprint("END;"), "END");
        // Identifiers that contain digits are not literals.
        assert_eq!(fingerprint("SELECT col1 FROM t2"), "SELECT col1 FROM t2");
        // Only IN lists collapse: a row's arity stays visible.
        assert_eq!(
            fingerprint("INSERT INTO t VALUES (1, 'a')"),
            "INSERT INTO t VALUES(?, ?)"
        );
        assert_eq!(
            fingerprint("SELECT a.k FROM \"main\".t a WHERE a.k = 1"),
            "SELECT a.k FROM \"main\".t a WHERE a.k = ?"
        );
    }

    #[test]
    fn fingerprints_are_bounded() {
        let long = format!("SELECT {}", "x, ".repeat(500));
        let fp = fingerprint(&long);
        assert_eq!(fp.chars().count(), FINGERPRINT_MAX);
        assert!(fp.ends_with('…'));
    }
}
