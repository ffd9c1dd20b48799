//! Where Redis is, and a connection that follows its master.
//!
//! An [`Endpoint`] is either one address (`redis://`, `rediss://`) or a set of Sentinels and the
//! name of the master they watch (`redis+sentinel://h1:26379,h2:26379/mymaster`). Every
//! connection of a replica is made through it, and every reconnection asks it again: redis-rs
//! reconnects to the address it was first given (its issue #1438), which after a failover is
//! a dead node, or a node that has become a replica. [`MasterConnection`] replaces the
//! `ConnectionManager`: on an error that says the node is gone or no longer the master
//! (I/O, READONLY, MASTERDOWN), it drops its connection, and the next command asks the
//! endpoint for the master again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, Value};

/// How to write a user or password that URL parsers would split elsewhere than meant.
const ENCODE: &str = "the user and password cannot be read as written: percent-encode their special characters \
                      (/ as %2F, ? as %3F, # as %23, @ as %40, : in the user as %3A, % as %25), and any @ after the hosts as %40";

/// Default port of a Sentinel.
const SENTINEL_PORT: u16 = 26379;

/// How long one Sentinel, or the master it names, may take to answer during a lookup: the next
/// Sentinel is asked after that, so one unreachable Sentinel costs at most this.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// Writes that must reach replicas before they count (see `publish_triggers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Confirm {
    /// Replicas that must acknowledge (Redis `WAIT`); 0 for none.
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
}

/// Where Redis is. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    kind: Arc<Kind>,
    confirm: Confirm,
    /// The URL with its password hidden, for logs and errors.
    shown: Arc<str>,
}

const NO_CONFIRM: Confirm = Confirm { replicas: 0, timeout: Duration::from_secs(1) };

enum Kind {
    Direct(Client),
    Sentinel(Sentinels),
}

struct Sentinels {
    /// One client per Sentinel, in the order given.
    sentinels: Vec<Client>,
    /// The Sentinel that answered last is asked first.
    preferred: AtomicUsize,
    master_name: String,
    /// `redis` or `rediss`, the user and password, and the database: the master's URL is
    /// `{scheme}://{userinfo}{address}{db}`.
    scheme: &'static str,
    userinfo: String,
    db: String,
    /// The master found last, to log when it changes.
    last_master: std::sync::Mutex<Option<String>>,
    /// Counts the changes of master, so that every connection made to an earlier one is
    /// replaced before its next use instead of failing once first.
    epoch: AtomicU64,
}

impl Endpoint {
    /// Parses `REDIS_URL`: a plain `redis://`/`rediss://` URL, or
    /// `redis+sentinel://[user:password@]host[:port],host[:port].../master[/db]` (`rediss+sentinel`
    /// for TLS to the Sentinels and the master). The user and password are the master's; the
    /// Sentinels' own, when they have one, are `GE_REDIS_SENTINEL_PASSWORD` (and
    /// `GE_REDIS_SENTINEL_USERNAME`). Errors never repeat a password.
    pub fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let shown = crate::core::redact::url(url);
        let kind = match url.split_once("://") {
            Some(("redis+sentinel", rest)) => Kind::Sentinel(Sentinels::parse("redis", rest, &shown)?),
            Some(("rediss+sentinel", rest)) => Kind::Sentinel(Sentinels::parse("rediss", rest, &shown)?),
            _ => Kind::Direct(super::client(url)?),
        };
        Ok(Endpoint { kind: Arc::new(kind), confirm: NO_CONFIRM, shown: shown.into() })
    }

    /// One address, for tools that start their own Redis.
    pub(crate) fn direct(client: Client) -> Endpoint {
        let shown = crate::core::redact::url(&client.get_connection_info().addr().to_string());
        Endpoint { kind: Arc::new(Kind::Direct(client)), confirm: NO_CONFIRM, shown: shown.into() }
    }

    /// The same endpoint, with trigger publications confirmed by `confirm.replicas` replicas.
    pub(crate) fn confirming(&self, confirm: Confirm) -> Endpoint {
        Endpoint { confirm, ..self.clone() }
    }

    pub(crate) fn confirm(&self) -> Confirm {
        self.confirm
    }

    /// The URL as given, password hidden.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// Changes whenever a new master is found; connections made under an earlier value lead
    /// to a node that is gone or no longer the master.
    fn epoch(&self) -> u64 {
        match &*self.kind {
            Kind::Direct(_) => 0,
            Kind::Sentinel(s) => s.epoch.load(Ordering::Acquire),
        }
    }

    /// A client for the master as of now: the one address, or the master the Sentinels name,
    /// once it has said (`ROLE`) that it is the master.
    pub async fn client(&self) -> RedisResult<Client> {
        match &*self.kind {
            Kind::Direct(c) => Ok(c.clone()),
            Kind::Sentinel(s) => s.master().await,
        }
    }
}

impl Sentinels {
    fn parse(scheme: &'static str, rest: &str, shown: &str) -> anyhow::Result<Sentinels> {
        let bad = |why: &str| anyhow::anyhow!("invalid REDIS_URL {shown}: {why}");
        // As every URL parser reads it (redis-rs's too, when it reads the master's URL made from
        // this one): the Sentinels' part ends at the first `/`, `?` or `#`, and the user and
        // password are what comes before its last `@`. An `@` after that point means a `/`, `?`
        // or `#` in the password (or an `@` in the path or query) left unencoded: the URL would
        // be split elsewhere than meant, and every connection to the master fail.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if rest[end..].contains('@') {
            return Err(bad(ENCODE));
        }
        let (userinfo, rest) = match rest[..end].rsplit_once('@') {
            Some((u, r)) => (format!("{u}@"), format!("{r}{}", &rest[end..])),
            None => (String::new(), rest.to_string()),
        };
        let rest = rest.as_str();
        let (hosts, path) = rest.split_once('/').ok_or_else(|| bad("no master name (…/mymaster after the Sentinels)"))?;
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let (master_name, db) = match path.split_once('/') {
            Some((m, d)) if !d.is_empty() => {
                d.parse::<u32>().map_err(|_| bad("the database after the master name must be a number"))?;
                (m, format!("/{d}"))
            }
            Some((m, _)) => (m, String::new()),
            None => (path, String::new()),
        };
        if master_name.is_empty() {
            return Err(bad("no master name (…/mymaster after the Sentinels)"));
        }
        // The master's URL is made from this one at every lookup: refused now, not there.
        if Client::open(format!("{scheme}://{userinfo}127.0.0.1:6379{db}")).is_err() {
            return Err(bad(ENCODE));
        }
        let sentinel_auth = match (std::env::var("GE_REDIS_SENTINEL_USERNAME").ok(), std::env::var("GE_REDIS_SENTINEL_PASSWORD").ok()) {
            (user, Some(pw)) if !pw.is_empty() => format!("{}:{}@", user.unwrap_or_default(), percent_encode(&pw)),
            _ => String::new(),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let address = with_port(host, SENTINEL_PORT).ok_or_else(|| bad(&format!("cannot read the Sentinel address {host:?}")))?;
            sentinels.push(super::client(&format!("{scheme}://{sentinel_auth}{address}"))?);
        }
        if sentinels.is_empty() {
            return Err(bad("no Sentinel address"));
        }
        Ok(Sentinels {
            sentinels,
            preferred: AtomicUsize::new(0),
            master_name: master_name.to_string(),
            scheme,
            userinfo,
            db,
            last_master: std::sync::Mutex::new(None),
            epoch: AtomicU64::new(0),
        })
    }

    /// Asks the Sentinels in turn, the last one that answered first, and returns the first
    /// master that confirms it is one. A Sentinel that lags behind a failover may still name
    /// the old master; if that node is back as a replica, its `ROLE` gives it away and the
    /// next Sentinel is asked.
    async fn master(&self) -> RedisResult<Client> {
        let n = self.sentinels.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        for i in 0..n {
            let at = (first + i) % n;
            match self.ask(&self.sentinels[at]).await {
                Ok((address, client)) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    let mut last = self.last_master.lock().unwrap_or_else(|p| p.into_inner());
                    if last.as_deref() != Some(address.as_str()) {
                        tracing::info!(master = %address, name = %self.master_name, "Redis master found through Sentinel");
                        *last = Some(address);
                        self.epoch.fetch_add(1, Ordering::AcqRel);
                    }
                    return Ok(client);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| RedisError::from((ErrorKind::EmptySentinelList, "no Sentinel"))))
    }

    async fn ask(&self, sentinel: &Client) -> RedisResult<(String, Client)> {
        let cfg = AsyncConnectionConfig::new().set_connection_timeout(Some(LOOKUP_TIMEOUT)).set_response_timeout(Some(LOOKUP_TIMEOUT));
        let mut con = sentinel.get_multiplexed_async_connection_with_config(&cfg).await?;
        let Some((host, port)) = master_addr(&mut con, &self.master_name).await? else {
            return Err(RedisError::from((
                ErrorKind::MasterNameNotFoundBySentinel,
                "the Sentinel does not know this master",
                self.master_name.clone(),
            )));
        };
        let address = with_port(&format!("{}:{port}", bracketed(&host)), 6379).ok_or_else(|| {
            RedisError::from((ErrorKind::InvalidClientConfig, "the Sentinel named an unreadable address", format!("{host}:{port}")))
        })?;
        let url = format!("{}://{}{address}{}", self.scheme, self.userinfo, self.db);
        let client = super::client(&url)
            .map_err(|e| RedisError::from((ErrorKind::InvalidClientConfig, "invalid master address", format!("{e:#}"))))?;
        let mut master = client.get_multiplexed_async_connection_with_config(&cfg).await?;
        match role(&mut master).await?.as_deref() {
            Some("master") => Ok((address, client)),
            _ => Err(RedisError::from((
                ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the node the Sentinel named is not the master",
                address,
            ))),
        }
    }
}

/// `SENTINEL GET-MASTER-ADDR-BY-NAME`: the address a Sentinel gives for the master `name`.
pub(crate) async fn master_addr<C: redis::aio::ConnectionLike>(con: &mut C, name: &str) -> RedisResult<Option<(String, u16)>> {
    redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(name).query_async(con).await
}

/// `ROLE`: `master`, `slave` or `sentinel`.
pub(crate) async fn role<C: redis::aio::ConnectionLike>(con: &mut C) -> RedisResult<Option<String>> {
    let role: Value = redis::cmd("ROLE").query_async(con).await?;
    Ok(match role {
        Value::Array(parts) => parts.first().and_then(super::text),
        _ => None,
    })
}

/// `INFO section`, as text.
pub(crate) async fn info<C: redis::aio::ConnectionLike>(con: &mut C, section: &str) -> RedisResult<String> {
    redis::cmd("INFO").arg(section).query_async(con).await
}

/// `host` or `host:port` (IPv6 in brackets) with the port filled in; None when unreadable.
fn with_port(host: &str, default: u16) -> Option<String> {
    if let Some(rest) = host.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        return Some(format!("[{ip}]:{port}"));
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some(format!("{h}:{}", p.parse::<u16>().ok()?)),
        Some(_) => None,
        None if !host.is_empty() => Some(format!("{host}:{default}")),
        None => None,
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Whether an error means this connection no longer reaches a master: the node is gone, or it
/// is a replica now (a master demoted by Sentinel answers writes with READONLY).
fn lost_master(e: &RedisError) -> bool {
    use redis::ServerErrorKind::{MasterDown, ReadOnly};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::Server(ReadOnly | MasterDown))
        // Inside a script or a MULTI the code is only in the text.
        || e.to_string().contains("READONLY")
}

/// The connection a replica's loops share, to whichever node is the master. Commands from all
/// clones go over one multiplexed connection; trigger publications, which wait for replicas,
/// over a second one (`WAIT` holds up every later command of its connection).
#[derive(Clone)]
pub struct MasterConnection {
    endpoint: Endpoint,
    slot: Arc<Slot>,
    fenced: Arc<Slot>,
}

/// A connection, its number, and the endpoint's epoch when it was made.
type Held = (u64, u64, MultiplexedConnection);

#[derive(Default)]
struct Slot {
    con: tokio::sync::Mutex<Option<Held>>,
    made: AtomicU64,
}

impl Slot {
    /// The connection, made (through the endpoint) when there is none or it leads to an
    /// earlier master.
    async fn get(&self, endpoint: &Endpoint) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut con = self.con.lock().await;
        if let Some((n, epoch, c)) = con.as_ref()
            && *epoch == endpoint.epoch()
        {
            return Ok((*n, c.clone()));
        }
        *con = None;
        let client = endpoint.client().await?;
        let epoch = endpoint.epoch();
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let c = client.get_multiplexed_async_connection_with_config(&cfg).await?;
        let n = self.made.fetch_add(1, Ordering::Relaxed) + 1;
        *con = Some((n, epoch, c.clone()));
        Ok((n, c))
    }

    /// Drops connection number `n`, unless another caller has already replaced it.
    async fn forget(&self, n: u64) {
        let mut con = self.con.lock().await;
        if con.as_ref().is_some_and(|(m, _, _)| *m == n) {
            *con = None;
        }
    }
}

/// Runs `pipe` on the master and, when the endpoint asks for it ([`Confirm`], a Sentinel URL
/// by default), ends it with `WAIT replicas timeout`, on the publications' own connection
/// (`WAIT` blocks its connection): fewer acknowledgements than asked is an error, so that the
/// caller records nothing and sends `what` again later. An asynchronous replica promoted by a
/// failover may lack what its master acknowledged. Returns the replies of `pipe`'s commands.
pub(crate) async fn query_confirmed(con: &mut MasterConnection, mut pipe: redis::Pipeline, what: &str) -> RedisResult<Vec<Value>> {
    let confirm = con.endpoint().confirm();
    if confirm.replicas == 0 {
        return pipe.query_async(con).await;
    }
    pipe.cmd("WAIT").arg(confirm.replicas).arg(confirm.timeout.as_millis().max(1) as u64);
    let mut replies: Vec<Value> = pipe.query_async(&mut con.fenced()).await?;
    let acked = match replies.pop() {
        Some(Value::Int(n)) => n,
        _ => -1,
    };
    if acked < i64::from(confirm.replicas) {
        return Err(RedisError::from((
            ErrorKind::Client,
            "not confirmed by enough Redis replicas",
            format!("{what}: {acked} of {} within {:?}; they are sent again later", confirm.replicas, confirm.timeout),
        )));
    }
    Ok(replies)
}

impl MasterConnection {
    /// Connects once, so that a wrong address or password shows at start.
    pub async fn connect(endpoint: &Endpoint) -> RedisResult<MasterConnection> {
        let m = MasterConnection { endpoint: endpoint.clone(), slot: Arc::default(), fenced: Arc::default() };
        m.slot.get(endpoint).await?;
        Ok(m)
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The same master over the publications' own connection.
    pub(crate) fn fenced(&self) -> MasterConnection {
        MasterConnection { endpoint: self.endpoint.clone(), slot: self.fenced.clone(), fenced: self.fenced.clone() }
    }
}

impl redis::aio::ConnectionLike for MasterConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        Box::pin(async move {
            let (n, mut con) = self.slot.get(&self.endpoint).await?;
            let reply = con.req_packed_command(cmd).await;
            if reply.as_ref().is_err_and(lost_master) {
                self.slot.forget(n).await;
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (n, mut con) = self.slot.get(&self.endpoint).await?;
            let reply = con.req_packed_commands(pipeline, offset, count).await;
            let lost = match &reply {
                Err(e) => lost_master(e),
                Ok(values) => values.iter().any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY")),
            };
            if lost {
                self.slot.forget(n).await;
            }
            reply
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinels(url: &str) -> Sentinels {
        match *Endpoint::parse(url).expect("parses").kind {
            Kind::Sentinel(_) => {}
            Kind::Direct(_) => panic!("{url} is not a Sentinel URL"),
        }
        let (scheme, rest) = url.split_once("://").unwrap();
        Sentinels::parse(if scheme.starts_with("rediss") { "rediss" } else { "redis" }, rest, url).unwrap()
    }

    #[test]
    fn reads_sentinel_urls() {
        let s = sentinels("redis+sentinel://h1:26380,h2,[::1]:5000/mymaster");
        assert_eq!(s.sentinels.len(), 3);
        assert_eq!(s.master_name, "mymaster");
        assert_eq!((s.scheme, s.userinfo.as_str(), s.db.as_str()), ("redis", "", ""));
        let addrs: Vec<String> = s.sentinels.iter().map(|c| c.get_connection_info().addr().to_string()).collect();
        assert_eq!(addrs, ["h1:26380", "h2:26379", "::1:5000"]);

        let s = sentinels("rediss+sentinel://app:p%40ss@h1:1,h2:2/ge/3");
        assert_eq!((s.scheme, s.userinfo.as_str(), s.db.as_str()), ("rediss", "app:p%40ss@", "/3"));
        assert_eq!(s.master_name, "ge");
    }

    #[test]
    fn refuses_bad_sentinel_urls_without_the_password() {
        for url in [
            "redis+sentinel://:secret@h1:26379",
            "redis+sentinel://:secret@h1:26379/",
            "redis+sentinel://:secret@/ge",
            "redis+sentinel://:secret@h1:x/ge",
            "redis+sentinel://:secret@h1/ge/zero",
        ] {
            let e = format!("{:#}", Endpoint::parse(url).err().unwrap_or_else(|| panic!("{url} accepted")));
            assert!(!e.contains("secret"), "{e}");
            assert!(e.contains("invalid REDIS_URL"), "{e}");
        }
    }

    /// An unencoded `/`, `#` or `?` in the password, or an `@` after the Sentinels, splits the
    /// URL elsewhere than meant: refused at start, saying how to encode it, without the password.
    #[test]
    fn refuses_unencoded_delimiters_saying_how_to_encode_them() {
        for url in [
            "redis+sentinel://:S3cr/et@h1:26379/ge",
            "redis+sentinel://:S3cr#et@h1:26379/ge",
            "redis+sentinel://:S3cr?et@h1:26379/ge",
            "rediss+sentinel://app:S3cr?et@h1,h2/ge/0",
            "redis+sentinel://:S3cret@h1:26379/ge?x=a@b",
        ] {
            let e = format!("{:#}", Endpoint::parse(url).err().unwrap_or_else(|| panic!("{url} accepted")));
            assert!(e.contains("percent-encode") && e.contains("%2F") && e.contains("%40"), "{url}: {e}");
            assert!(!e.contains("S3"), "{url}: the error shows the password: {e}");
        }
        let s = sentinels("redis+sentinel://:S3cr%2F%23%3F%40et@h1/ge?x=1");
        assert_eq!((s.userinfo.as_str(), s.master_name.as_str()), (":S3cr%2F%23%3F%40et@", "ge"));
    }

    #[test]
    fn plain_urls_stay_direct() {
        let e = Endpoint::parse("redis://:pw@127.0.0.1:6379/0").unwrap();
        assert!(matches!(*e.kind, Kind::Direct(_)));
        assert_eq!(e.shown(), "redis://:***@127.0.0.1:6379/0");
    }

    #[test]
    fn errors_that_mean_a_new_master_is_needed() {
        let readonly = RedisError::from((ErrorKind::Server(redis::ServerErrorKind::ReadOnly), "READONLY"));
        assert!(lost_master(&readonly));
        let io = RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(lost_master(&io));
        let nogroup = RedisError::from((ErrorKind::Server(redis::ServerErrorKind::ResponseError), "NOGROUP no such group"));
        assert!(!lost_master(&nogroup));
    }
}
