//! Decoding client requests seen on the wire (the first bytes a client wrote to a socket):
//! PostgreSQL's frontend messages (simple query, Parse, Bind) and Redis RESP commands.
//! Whatever does not decode is reported as such, never trusted.

/// What a request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRequest {
    /// The statement (PostgreSQL) or command with its arguments as `?` (Redis).
    pub text: String,
    /// PostgreSQL Parse of a named statement: the name (its text is `text`).
    pub parse_name: Option<String>,
    /// PostgreSQL Bind of a named statement without a Parse before it in the same write.
    pub bind_name: Option<String>,
    /// MySQL COM_STMT_PREPARE: the reply names the statement (`text` is its text).
    pub prepare: bool,
    /// MySQL COM_STMT_EXECUTE: the statement id.
    pub execute_id: Option<u32>,
}

fn cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|b| *b == 0)?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

/// A PostgreSQL frontend request: 'Q' (simple query), 'P' (Parse, then usually Bind,
/// Execute, Sync in the same write) or 'B' (Bind of a statement parsed earlier).
pub fn postgres(bytes: &[u8]) -> Option<WireRequest> {
    let (&kind, rest) = bytes.split_first()?;
    let body = rest.get(4..)?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match kind {
        b'Q' => {
            // The write may be cut at our 256-byte limit: then there is no NUL.
            let query = cstr(body).map_or(body, |(q, _)| q);
            Some(WireRequest {
                text: text(query),
                parse_name: None,
                bind_name: None,
                prepare: false,
                execute_id: None,
            })
        }
        b'P' => {
            let (name, rest) = cstr(body)?;
            let query = cstr(rest).map_or(rest, |(q, _)| q);
            Some(WireRequest {
                text: text(query),
                parse_name: (!name.is_empty()).then(|| text(name)),
                bind_name: None,
                prepare: false,
                execute_id: None,
            })
        }
        b'B' => {
            let (_portal, rest) = cstr(body)?;
            let (name, _) = cstr(rest)?;
            Some(WireRequest {
                text: format!("EXECUTE {}", text(name)),
                parse_name: None,
                bind_name: Some(text(name)),
                prepare: false,
                execute_id: None,
            })
        }
        _ => None,
    }
}

/// A MySQL COM_QUERY or COM_STMT_PREPARE: 3-byte length, sequence number, command, text.
pub fn mysql(bytes: &[u8]) -> Option<WireRequest> {
    let header = bytes.get(..5)?;
    if header[3] != 0 || !matches!(header[4], 0x03 | 0x16 | 0x17) {
        return None;
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    let body = &bytes[5..bytes.len().min(4 + len)];
    if header[4] == 0x17 {
        let id = u32::from_le_bytes(body.get(..4)?.try_into().ok()?);
        return Some(WireRequest {
            text: format!("EXECUTE statement {id}"),
            parse_name: None,
            bind_name: None,
            prepare: false,
            execute_id: Some(id),
        });
    }
    if len < 2 || body.is_empty() || std::str::from_utf8(body).is_err() {
        return None;
    }
    Some(WireRequest {
        text: String::from_utf8_lossy(body).into_owned(),
        parse_name: None,
        bind_name: None,
        prepare: header[4] == 0x16,
        execute_id: None,
    })
}

/// The statement id in a MySQL PREPARE_OK reply (`[len3][seq][0x00][id u32]…`).
pub fn mysql_prepared_id(reply: &[u8]) -> Option<u32> {
    (reply.get(4) == Some(&0)).then_some(())?;
    Some(u32::from_le_bytes(reply.get(5..9)?.try_into().ok()?))
}

/// Every whole Redis command in `bytes` (a pipeline written at once), in order, and
/// whether bytes were left that are no whole command (a command cut at the end).
pub fn redis_all(bytes: &[u8]) -> (Vec<WireRequest>, bool) {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some((request, used)) = redis_one(rest) else {
            return (out, true);
        };
        out.push(request);
        rest = &rest[used..];
    }
    (out, false)
}

/// One RESP command at the start of `bytes` and the bytes it takes, when it is whole.
fn redis_one(bytes: &[u8]) -> Option<(WireRequest, usize)> {
    let request = redis(bytes)?;
    let line = |from: usize| -> Option<(usize, usize)> {
        // The number after bytes[from] (a '*' or '$') and where its line ends.
        let end = from + bytes.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(bytes.get(from + 1..end)?)
            .ok()?
            .parse()
            .ok()?;
        Some((n, end + 2))
    };
    let (count, mut at) = line(0)?;
    for _ in 0..count {
        if bytes.get(at) != Some(&b'$') {
            return None;
        }
        let (len, data) = line(at)?;
        at = data + len + 2;
        if bytes.get(at - 2..at)? != b"\r\n" {
            return None;
        }
    }
    Some((request, at))
}

/// A Redis RESP command: `*N\r\n$L\r\nCMD\r\n…` → `CMD ? ?` (arguments are data).
pub fn redis(bytes: &[u8]) -> Option<WireRequest> {
    let rest = bytes.strip_prefix(b"*")?;
    let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let count: usize = std::str::from_utf8(&rest[..line_end]).ok()?.parse().ok()?;
    let rest = rest[line_end + 2..].strip_prefix(b"$")?;
    let len_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let len: usize = std::str::from_utf8(&rest[..len_end]).ok()?.parse().ok()?;
    let name = rest.get(len_end + 2..len_end + 2 + len)?;
    if count == 0
        || name.is_empty()
        || !name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.' || *b == b'-')
    {
        return None;
    }
    let mut text = String::from_utf8_lossy(name).to_ascii_uppercase();
    for _ in 1..count.min(16) {
        text.push_str(" ?");
    }
    if count > 16 {
        text.push_str(" …");
    }
    Some(WireRequest {
        text,
        parse_name: None,
        bind_name: None,
        prepare: false,
        execute_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn postgres_simple_parse_and_bind() {
        let q = message(b'Q', b"SELECT 1\0");
        assert_eq!(postgres(&q).unwrap().text, "SELECT 1");
        let mut p = message(b'P', b"s1\0SELECT * FROM t WHERE id = $1\0\0\0");
        p.extend(message(b'B', b"\0s1\0\0\0\0\0\0\0"));
        let parsed = postgres(&p).unwrap();
        assert_eq!(parsed.text, "SELECT * FROM t WHERE id = $1");
        assert_eq!(parsed.parse_name.as_deref(), Some("s1"));
        let b = message(b'B', b"\0s1\0\0\0\0\0\0\0");
        assert_eq!(postgres(&b).unwrap().bind_name.as_deref(), Some("s1"));
        // Cut at the capture limit: still the start of the text.
        let cut = &q[..8];
        assert_eq!(postgres(cut).unwrap().text, "SEL");
    }

    #[test]
    fn redis_commands_keep_the_name_and_hide_the_arguments() {
        let set = b"*3\r\n$3\r\nset\r\n$5\r\nkey:1\r\n$3\r\nabc\r\n";
        assert_eq!(redis(set).unwrap().text, "SET ? ?");
        assert_eq!(redis(b"*1\r\n$4\r\nPING\r\n").unwrap().text, "PING");
        let mset = format!("*21\r\n$4\r\nMSET\r\n{}", "$1\r\nx\r\n".repeat(20));
        assert!(redis(mset.as_bytes()).unwrap().text.ends_with('…'));
    }

    #[test]
    fn redis_pipelines_are_split_into_their_commands() {
        let set = b"*3\r\n$3\r\nSET\r\n$5\r\nkey:1\r\n$3\r\na\r\n\r\n";
        let get = b"*2\r\n$3\r\nGET\r\n$5\r\nkey:1\r\n";
        let mut pipeline = Vec::new();
        for _ in 0..3 {
            pipeline.extend_from_slice(set);
            pipeline.extend_from_slice(get);
        }
        let (requests, cut) = redis_all(&pipeline);
        let texts: Vec<&str> = requests.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(
            texts,
            ["SET ? ?", "GET ?", "SET ? ?", "GET ?", "SET ? ?", "GET ?"]
        );
        assert!(!cut);
        // Cut inside the fourth command: three whole ones, and the rest said to be cut.
        let (requests, cut) = redis_all(&pipeline[..set.len() * 2 + get.len() + 10]);
        assert_eq!(requests.len(), 3);
        assert!(cut);
        // A value's bytes that look like a command are data.
        let tricky = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$14\r\n*1\r\n$4\r\nPING\r\n\r\n";
        let (requests, cut) = redis_all(tricky);
        assert_eq!((requests.len(), cut), (1, false));
    }

    #[test]
    fn mysql_com_query() {
        let sql = b"SELECT 1";
        let mut packet = ((sql.len() + 1) as u32).to_le_bytes()[..3].to_vec();
        packet.extend([0, 0x03]);
        packet.extend(sql);
        assert_eq!(mysql(&packet).unwrap().text, "SELECT 1");
        packet[4] = 0x01; // COM_QUIT
        assert!(mysql(&packet).is_none());
        assert!(mysql(b"\x05\0\0\x01\x03abcd").is_none()); // sequence 1: not a request
        let execute = b"\x0b\0\0\0\x17\x07\0\0\0\0\x01\0\0\0";
        assert_eq!(mysql(execute).unwrap().execute_id, Some(7));
        let ok = b"\x0c\0\0\x01\x00\x07\0\0\0\x01\0\x01\0\0\0\0";
        assert_eq!(mysql_prepared_id(ok), Some(7));
        assert_eq!(mysql_prepared_id(b"\x05\0\0\x01\xff\x01\x02\x03\x04"), None);
    }

    #[test]
    fn garbage_is_not_a_request() {
        for junk in [
            &b""[..],
            b"Q",
            b"Q\0\0\0\x05",
            b"P\0\0\0\x09noterminator",
            b"B\0\0\0\x08\0",
            b"*x\r\n",
            b"*2\r\n$99\r\nGET\r\n",
            b"*1\r\n$3\r\n\x00\x01\x02\r\n",
            b"\xff\xfe\xfd\xfc\xfb",
        ] {
            assert!(postgres(junk).is_none_or(|r| !r.text.is_empty() || junk[0] == b'Q'));
            assert!(redis(junk).is_none(), "{junk:?}");
        }
        assert!(postgres(b"P\0\0\0\x09noterminator").is_none());
        assert!(postgres(b"B\0\0\0\x08\0").is_none());
        assert!(postgres(b"X\0\0\0\x04").is_none());
    }
}
