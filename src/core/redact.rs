//! Keeps passwords out of logs, health entries and error messages.
//!
//! A connection string may carry a password wherever sqlx or redis-rs read one: the URL's
//! userinfo (`scheme://user:secret@host`), a query parameter (`?password=` for sqlx, `?pass=`
//! for redis-rs on a Unix socket), or, in text that is no URL, libpq's key/value form
//! (`host=h password=secret`), which sqlx does not take but an operator may still try. Each is
//! shown as `***`. Text that cannot be split safely is hidden rather than shown in part.

/// What stands in for a hidden value.
const HIDDEN: &str = "***";

/// Whether a parameter named `key` holds a secret: `password`, `pass`, `sslpassword`, ... in
/// any case (the name percent-decoded first, so an encoded name hides nothing).
fn is_secret_key(key: &str) -> bool {
    percent_decode(key).to_ascii_lowercase().contains("pass")
}

/// `%XX` sequences decoded, anything else kept; lossy, for comparing names only.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `(name, value)` pairs of a URL's query (between `?` and `#`), as written.
pub(crate) fn query_pairs(u: &str) -> Vec<(&str, &str)> {
    let Some((_, query)) = u.split_once('?') else { return Vec::new() };
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect()
}

/// A connection string with every password in it replaced by `***`: a URL's userinfo password
/// and its password query parameters, or the password values of a key/value conninfo.
pub fn url(u: &str) -> String {
    match u.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", url_rest(rest)),
        None => conninfo(u),
    }
}

/// The part of a URL after `scheme://`, its password hidden.
fn url_rest(rest: &str) -> String {
    // The authority ends at the first `/`, `?` or `#`, as the URL parsers of both clients read
    // it; the userinfo is what comes before its last `@`.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (authority, tail) = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            let userinfo = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{HIDDEN}"),
                None => userinfo.to_string(),
            };
            (format!("{userinfo}{host}"), tail.to_string())
        }
        // An `@` further on, with none in the authority, may end a password that holds an
        // unencoded `/`, `?` or `#`: everything up to it is hidden.
        None => match tail.rfind('@') {
            Some(at) => return format!("{HIDDEN}{}", hide_query(&tail[at..])),
            None => (authority.to_string(), tail.to_string()),
        },
    };
    format!("{authority}{}", hide_query(&tail))
}

/// A URL's path, query and fragment with the values of secret query parameters hidden.
fn hide_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else { return tail.to_string() };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, format!("#{f}")),
        None => (query, String::new()),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}={HIDDEN}"),
            _ => p.to_string(),
        })
        .collect();
    format!("{path}?{}{fragment}", pairs.join("&"))
}

/// libpq's key/value form (`host=h password='a b' dbname=d`): the value of every secret key
/// hidden, whether bare or single-quoted (with `\'` and `\\` escapes). Text of any other shape
/// comes back as it is.
fn conninfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        // A key: a run of characters up to `=` or whitespace.
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if key.is_empty() || j >= b.len() || b[j] != b'=' {
            // Not `key =`: copy one character on and look again.
            let next = s[start..].chars().next().map_or(1, char::len_utf8).max(i - start);
            out.push_str(&s[start..start + next]);
            i = start + next;
            continue;
        }
        j += 1;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        let value_start = j;
        if j < b.len() && b[j] == b'\'' {
            j += 1;
            while j < b.len() && b[j] != b'\'' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            j = (j + 1).min(b.len());
        } else {
            while j < b.len() && !b[j].is_ascii_whitespace() {
                j += 1;
            }
        }
        out.push_str(&s[start..value_start]);
        out.push_str(if is_secret_key(key) { HIDDEN } else { &s[value_start..j] });
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hides_passwords() {
        assert_eq!(super::url("redis://:s3cret@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
        assert_eq!(super::url("postgres://app:pw@db/x?sslmode=require"), "postgres://app:***@db/x?sslmode=require");
        assert_eq!(super::url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    /// Every place sqlx and redis-rs take a password from: the userinfo, a `password` (sqlx)
    /// or `pass` (redis-rs, Unix sockets) query parameter, and libpq's key/value form.
    #[test]
    fn hides_passwords_in_every_form_the_clients_take() {
        for (given, secret) in [
            ("postgresql://postgres@127.0.0.1:1/db?password=S3cr3t", "S3cr3t"),
            ("postgresql://postgres@127.0.0.1:1/db?sslmode=disable&PASSWORD=S3cr3t&x=1", "S3cr3t"),
            ("postgres://u:S3cr3t@h/db?password=Other1", "Other1"),
            ("postgres://u:S3cr3t@h/db?password=Other1", "S3cr3t"),
            ("redis+unix:///run/redis.sock?db=1&pass=S3cr3t", "S3cr3t"),
            ("postgres://u:p@ss:S3cr3t@h/db", "S3cr3t"),
            ("host=127.0.0.1 port=1 password=S3cr3t dbname=db", "S3cr3t"),
            ("host=127.0.0.1 password = 'S3 cr\\'3t' dbname=db", "cr\\'3t"),
        ] {
            let shown = super::url(given);
            assert!(!shown.contains(secret), "{given} shown as {shown}");
            assert!(shown.contains("***"), "{given} shown as {shown}");
        }
        assert_eq!(
            super::url("postgresql://postgres@127.0.0.1:1/db?sslmode=disable&password=S3cr3t"),
            "postgresql://postgres@127.0.0.1:1/db?sslmode=disable&password=***"
        );
        assert_eq!(super::url("host=h password=S3cr3t"), "host=h password=***");
    }
}
