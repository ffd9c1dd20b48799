//! Keeps passwords out of logs, health entries and error messages.

/// `scheme://user:secret@host/...` becomes `scheme://user:***@host/...`.
pub fn url(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else { return u.to_string() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return u.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => u.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hides_passwords() {
        assert_eq!(super::url("redis://:s3cret@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
        assert_eq!(super::url("postgres://app:pw@db/x?sslmode=require"), "postgres://app:***@db/x?sslmode=require");
        assert_eq!(super::url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
