//! Settings shared by every subcommand: where Redis and PostgreSQL are, the names of the
//! streams (all configurable, defaults from the contract), and the intervals and limits of a
//! replica.

use std::path::PathBuf;
use std::time::Duration;

use crate::core::limits::Limits;
use crate::core::retention::{AgentPolicies, MaxLen, Period, TriggerPolicy};

/// The longest period or lifetime a setting may have. Far beyond any sensible value, and
/// short enough that adding it to an instant cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A period or lifetime: more than zero (a zero period panics `tokio::time::interval` inside a
/// loop's task, `BLOCK 0` blocks forever, a zero TTL is refused by Redis) and at most a year.
fn check_duration(d: Duration) -> Result<(), String> {
    if d.is_zero() {
        Err("must be more than 0".into())
    } else if d > MAX_DURATION {
        Err(format!("must be at most {} days", MAX_DURATION.as_secs() / 86_400))
    } else {
        Ok(())
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (a duration like 500ms, 5s, 2m, 7days)"))?;
    check_duration(d).map(|()| d)
}

/// A duration that may be zero (a floor, which zero lowers out of the way).
fn duration_or_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (a duration like 0s, 500ms, 5s, 2m, 7days)"))
}

/// Redis keys and the consumer group. Defaults are the contract's names.
#[derive(clap::Args, Clone, Debug)]
pub struct Names {
    #[arg(long, env = "GE_GROUP", default_value = "orchestrator-group")]
    pub group: String,
    #[arg(long, env = "GE_STREAM_INCOMING", default_value = "ge:work:incoming")]
    pub incoming: String,
    #[arg(long, env = "GE_STREAM_COMPLETED", default_value = "ge:work:completed")]
    pub completed: String,
    #[arg(long, env = "GE_STREAM_FAILED", default_value = "ge:work:failed")]
    pub failed: String,
    #[arg(long, env = "GE_STREAM_DEADLETTER", default_value = "ge:work:deadletter")]
    pub deadletter: String,
    #[arg(long, env = "GE_STREAM_HEALTH", default_value = "system.health")]
    pub health: String,
    /// Agents' heartbeats for a dispatch still running (contract v1.1).
    #[arg(long, env = "GE_STREAM_HEARTBEAT", default_value = "ge:work:heartbeat")]
    pub heartbeat: String,
    /// (v1.6) Outside events that waiting work packages wait for, by key.
    #[arg(long, env = "GE_STREAM_EVENTS", default_value = "ge:work:events")]
    pub events: String,
    #[arg(long, env = "GE_RELOAD_CHANNEL", default_value = "ge:config:reload")]
    pub reload_channel: String,
    /// Prefix of each agent's trigger stream; the agent name follows it.
    #[arg(long, env = "GE_TRIGGER_PREFIX", default_value = "triggers.")]
    pub trigger_prefix: String,
    /// Prefix of the keys that make trigger publication idempotent per dispatch_id.
    #[arg(long, env = "GE_DISPATCH_KEY_PREFIX", default_value = "ge:dispatched:")]
    pub dispatch_key_prefix: String,
    /// Prefix of each agent's stream of cancel notices (contract v1.6); the agent name follows.
    #[arg(long, env = "GE_CANCEL_PREFIX", default_value = "cancels.")]
    pub cancel_prefix: String,
    /// Pub/sub channel on which an operator's action asks every replica for a dispatch round
    /// (contract v1.6).
    #[arg(long, env = "GE_WAKE_CHANNEL", default_value = "ge:ops:wake")]
    pub wake_channel: String,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            group: "orchestrator-group".into(),
            incoming: "ge:work:incoming".into(),
            completed: "ge:work:completed".into(),
            failed: "ge:work:failed".into(),
            deadletter: "ge:work:deadletter".into(),
            health: "system.health".into(),
            heartbeat: "ge:work:heartbeat".into(),
            events: "ge:work:events".into(),
            reload_channel: "ge:config:reload".into(),
            trigger_prefix: "triggers.".into(),
            dispatch_key_prefix: "ge:dispatched:".into(),
            cancel_prefix: "cancels.".into(),
            wake_channel: "ge:ops:wake".into(),
        }
    }
}

impl Names {
    pub(crate) fn trigger_stream(&self, agent: &str) -> String {
        format!("{}{}", self.trigger_prefix, agent)
    }
    pub(crate) fn cancel_stream(&self, agent: &str) -> String {
        format!("{}{}", self.cancel_prefix, agent)
    }
    pub(crate) fn dispatch_key(&self, dispatch_id: &str) -> String {
        format!("{}{}", self.dispatch_key_prefix, dispatch_id)
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct Connections {
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

/// Everything one replica needs. Every interval and limit is a flag with an env twin.
#[derive(clap::Args, Clone, Debug)]
pub struct RunSettings {
    #[command(flatten)]
    pub conn: Connections,
    #[command(flatten)]
    pub names: Names,
    /// The routing file.
    #[arg(long = "config", env = "GE_ROUTING_CONFIG", default_value = "config/dolly-routing.yaml")]
    pub config: PathBuf,
    /// Consumer name in the group; default hostname plus a random suffix.
    #[arg(long, env = "GE_CONSUMER")]
    pub consumer: Option<String>,
    /// Entries read per XREADGROUP.
    #[arg(long, env = "GE_BATCH_SIZE", default_value_t = 100)]
    pub batch_size: usize,
    /// How long one XREADGROUP blocks; shutdown waits at most this long for a read in flight.
    #[arg(long, env = "GE_BLOCK", default_value = "5s", value_parser = duration)]
    pub block: Duration,
    #[arg(long, env = "GE_HEALTH_INTERVAL", default_value = "30s", value_parser = duration)]
    pub health_interval: Duration,
    /// How often the pending-entry sweep runs.
    #[arg(long, env = "GE_RECOVER_INTERVAL", default_value = "60s", value_parser = duration)]
    pub recover_interval: Duration,
    /// An entry pending this long with another consumer is claimed by the sweep.
    #[arg(long, env = "GE_CLAIM_MIN_IDLE", default_value = "60s", value_parser = duration)]
    pub claim_min_idle: Duration,
    /// A replica's lease lives this long unless refreshed; a consumer without a live lease is
    /// taken over at once.
    #[arg(long, env = "GE_LEASE_TTL", default_value = "2s", value_parser = duration)]
    pub lease_ttl: Duration,
    #[arg(long, env = "GE_LEASE_REFRESH", default_value = "500ms", value_parser = duration)]
    pub lease_refresh: Duration,
    #[arg(long, env = "GE_LEASE_PREFIX", default_value = "ge:lease:")]
    pub lease_prefix: String,
    /// A replica that reaches Redis but has had no answer from PostgreSQL for this long stands
    /// down: it stops reading, gives up its lease so that others take its entries over, and
    /// reports not ready until PostgreSQL answers again.
    #[arg(long, env = "GE_POSTGRES_LOST_AFTER", default_value = "2s", value_parser = duration)]
    pub postgres_lost_after: Duration,
    /// An entry delivered more often than this is dead-lettered as `poison`.
    #[arg(long, env = "GE_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u64,
    /// How often held work (retry timers, freed slots, lane gates) is re-examined.
    #[arg(long, env = "GE_SCHEDULER_INTERVAL", default_value = "500ms", value_parser = duration)]
    pub scheduler_interval: Duration,
    /// A dispatch claimed in PostgreSQL but not yet seen published after this long is
    /// published again (idempotently) by whichever replica notices.
    #[arg(long, env = "GE_REPUBLISH_AFTER", default_value = "5s", value_parser = duration)]
    pub republish_after: Duration,
    /// (v1.6) How long an event that no work package waited for is kept for one that comes to
    /// wait for its key.
    #[arg(long, env = "GE_EVENT_MAX_AGE", default_value = "1day", value_parser = duration)]
    pub event_max_age: Duration,
    /// (v1.6) The most events kept at once; beyond it the oldest are dropped (and counted).
    #[arg(long, env = "GE_EVENT_MAX_KEPT", default_value_t = 10_000)]
    pub event_max_kept: i64,
    /// Redis replicas that must acknowledge a trigger (Redis WAIT) before it is recorded as
    /// published; unconfirmed triggers are published again. Default: 1 with a Sentinel URL,
    /// else 0 (no WAIT).
    #[arg(long, env = "GE_REDIS_WAIT_REPLICAS")]
    pub redis_wait_replicas: Option<u32>,
    /// How long a publication waits for those acknowledgements.
    #[arg(long, env = "GE_REDIS_WAIT_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub redis_wait_timeout: Duration,
    /// How long the per-dispatch_id idempotency keys live in Redis.
    #[arg(long, env = "GE_DISPATCH_KEY_TTL", default_value = "7days", value_parser = duration)]
    pub dispatch_key_ttl: Duration,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub retention: Retention,
    #[arg(long, env = "GE_DEADLETTER_MAXLEN", default_value_t = 100_000)]
    pub deadletter_maxlen: u64,
    /// Bytes a dead letter keeps of each original value; a longer one is cut, its full size
    /// and SHA-256 recorded beside it, and the dead letter can no longer be requeued.
    #[arg(long, env = "GE_DEADLETTER_VALUE_BYTES", default_value_t = 4096)]
    pub deadletter_value_bytes: usize,
    #[arg(long, env = "GE_HEALTH_MAXLEN", default_value_t = 10_000)]
    pub health_maxlen: u64,
    /// Address of /healthz, /readyz, /metrics, the admin API and the dashboard; `off` for none.
    #[arg(long, env = "GE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: String,
    /// How long a client has to send a request's headers; an idle connection is closed after
    /// as long.
    #[arg(long, env = "GE_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub http_header_timeout: Duration,
    /// The longest a request is worked on (then it is answered 503), and the longest writing
    /// its response may stall on a client that does not read (then the connection is closed).
    #[arg(long, env = "GE_HTTP_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub http_request_timeout: Duration,
    /// Connections served at once; one more is answered 503 and closed.
    #[arg(long, env = "GE_HTTP_MAX_CONNECTIONS", default_value_t = 64)]
    pub http_max_connections: usize,
    /// Bearer token that admin API calls which change something must carry. Unset: such
    /// calls are refused (403). Only the environment is read, so it stays out of `ps`. As
    /// read: surrounding whitespace is ignored where it is compared (`ops::admin`), and one
    /// that is empty without it is refused by `validate`.
    #[arg(skip = std::env::var("GE_ADMIN_TOKEN").ok())]
    pub admin_token: Option<String>,
    /// Bearer token that every read of the admin API and /metrics must carry (the admin token
    /// does too). Unset: reads are open. The probes, the dashboard's page and the API document
    /// stay open either way. Only the environment is read; as read, like `admin_token`.
    #[arg(skip = std::env::var("GE_ADMIN_READ_TOKEN").ok())]
    pub admin_read_token: Option<String>,
    /// PostgreSQL connections of this replica's engine.
    #[arg(long, env = "GE_DB_POOL", default_value_t = 8)]
    pub db_pool: u32,
    /// PostgreSQL connections for the operators' reads (admin API, /metrics, the dashboard),
    /// apart from the engine's, so that no number of slow reads can starve ingest or dispatch.
    #[arg(long, env = "GE_DB_OPS_POOL", default_value_t = 2)]
    pub db_ops_pool: u32,
    /// The longest any one statement of this replica may run (PostgreSQL `statement_timeout`);
    /// a longer one is cancelled and fails like a lost connection.
    #[arg(long, env = "GE_STATEMENT_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub statement_timeout: Duration,
    /// (v1.6) The share of a budget, in percent, at which its spend is warned about (log,
    /// metric, dashboard).
    #[arg(long, env = "GE_BUDGET_WARN_AT", default_value_t = 80)]
    pub budget_warn_at: u64,
}

impl RunSettings {
    /// Settings with the defaults above, for tests and the dev stack.
    pub fn new(redis_url: String, database_url: String, config: PathBuf) -> Self {
        RunSettings {
            conn: Connections { redis_url, database_url },
            names: Names::default(),
            config,
            consumer: None,
            batch_size: 100,
            block: Duration::from_secs(5),
            health_interval: Duration::from_secs(30),
            recover_interval: Duration::from_secs(60),
            claim_min_idle: Duration::from_secs(60),
            max_deliveries: 5,
            lease_ttl: Duration::from_secs(2),
            lease_refresh: Duration::from_millis(500),
            lease_prefix: "ge:lease:".into(),
            postgres_lost_after: Duration::from_secs(2),
            scheduler_interval: Duration::from_millis(500),
            republish_after: Duration::from_secs(5),
            event_max_age: Duration::from_secs(86_400),
            event_max_kept: 10_000,
            dispatch_key_ttl: Duration::from_secs(7 * 24 * 3600),
            redis_wait_replicas: None,
            redis_wait_timeout: Duration::from_secs(1),
            limits: Limits::default(),
            retention: Retention::default(),
            deadletter_maxlen: 100_000,
            deadletter_value_bytes: 4096,
            health_maxlen: 10_000,
            db_pool: 8,
            db_ops_pool: 2,
            statement_timeout: Duration::from_secs(30),
            http_addr: "off".into(),
            http_header_timeout: Duration::from_secs(10),
            http_request_timeout: Duration::from_secs(30),
            http_max_connections: 64,
            admin_token: None,
            admin_read_token: None,
            budget_warn_at: 80,
        }
    }

    /// The warning threshold of budgets as a fraction.
    pub(crate) fn budget_warn_ratio(&self) -> f64 {
        self.budget_warn_at as f64 / 100.0
    }

    /// Refuses settings that cannot work, each problem naming its flag and variable: zero or
    /// absurd periods, sizes of zero, and a lease that lapses between its refreshes. Called
    /// before anything connects, so a bad value stops the start, not a loop later on.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        let durations = [
            ("block", self.block),
            ("health_interval", self.health_interval),
            ("recover_interval", self.recover_interval),
            ("claim_min_idle", self.claim_min_idle),
            ("lease_ttl", self.lease_ttl),
            ("lease_refresh", self.lease_refresh),
            ("postgres_lost_after", self.postgres_lost_after),
            ("scheduler_interval", self.scheduler_interval),
            ("republish_after", self.republish_after),
            ("dispatch_key_ttl", self.dispatch_key_ttl),
            ("redis_wait_timeout", self.redis_wait_timeout),
            ("statement_timeout", self.statement_timeout),
            ("http_header_timeout", self.http_header_timeout),
            ("http_request_timeout", self.http_request_timeout),
            ("retention_interval", self.retention.retention_interval),
        ];
        for (id, d) in durations {
            if let Err(e) = check_duration(d) {
                problems.push(format!("{} {e}, not {}", flag(id), humantime::format_duration(d)));
            }
        }
        // PostgreSQL takes it in milliseconds in an int4.
        const MAX_STATEMENT_TIMEOUT: Duration = Duration::from_secs(24 * 86_400);
        if self.statement_timeout > MAX_STATEMENT_TIMEOUT {
            let given = humantime::format_duration(self.statement_timeout);
            problems.push(format!("{} must be at most 24 days, not {given}", flag("statement_timeout")));
        }
        // Upper bounds beyond which a value is a mistake: Redis takes no bulk string over
        // 512 MiB, and a batch is one PostgreSQL transaction.
        const MIB_512: u64 = 512 << 20;
        let sizes = [
            ("batch_size", self.batch_size as u64, 1, 10_000),
            ("max_deliveries", self.max_deliveries, 1, u64::MAX),
            ("deadletter_maxlen", self.deadletter_maxlen, 1, u64::MAX),
            ("deadletter_value_bytes", self.deadletter_value_bytes as u64, 1, MIB_512),
            ("health_maxlen", self.health_maxlen, 1, u64::MAX),
            ("db_pool", u64::from(self.db_pool), 1, 1_000),
            ("db_ops_pool", u64::from(self.db_ops_pool), 1, 1_000),
            ("budget_warn_at", self.budget_warn_at, 1, 100),
            ("http_max_connections", self.http_max_connections as u64, 1, 100_000),
            ("max_payload_bytes", self.limits.max_payload_bytes as u64, 1, MIB_512),
            ("max_field_bytes", self.limits.max_field_bytes as u64, 1, MIB_512),
            // Beyond it, Redis's Lua could not pass a trigger's fields to XADD.
            ("max_fields", self.limits.max_fields as u64, 1, crate::engine::streams::MAX_ENTRY_FIELDS as u64),
            ("max_depends_on", self.limits.max_depends_on as u64, 0, 1_000_000),
            ("retention_batch", self.retention.retention_batch, 1, 100_000),
        ];
        for (id, v, min, max) in sizes {
            if !(min..=max).contains(&v) {
                let range = if max == u64::MAX { format!("at least {min}") } else { format!("between {min} and {max}") };
                problems.push(format!("{} must be {range}, not {v}", flag(id)));
            }
        }
        let orders = [
            (
                "lease_refresh",
                self.lease_refresh,
                "lease_ttl",
                self.lease_ttl,
                "the lease lapses between refreshes and survivors take this replica over",
            ),
            (
                "republish_after",
                self.republish_after,
                "dispatch_key_ttl",
                self.dispatch_key_ttl,
                "a dispatch published again after its key expired goes out twice",
            ),
        ];
        let mut orders = orders.to_vec();
        if let Some(kept) = self.retention.retention.0 {
            if kept < self.retention.retention_floor {
                let (k, f) = (humantime::format_duration(kept), humantime::format_duration(self.retention.retention_floor));
                problems.push(format!(
                    "{} ({k}) is shorter than {} ({f}): a replica stalled longer than the retention could send a trigger \
                     twice, and a dependent sent later than that after its prerequisite finished would wait for ever; \
                     lower the floor only where nothing can stall that long",
                    flag("retention"),
                    flag("retention_floor")
                ));
            }
            orders.push((
                "republish_after",
                self.republish_after,
                "retention",
                kept,
                "a dispatch published again after its key expired (keys live no longer than the retention) goes out twice",
            ));
        }
        for (short_id, short, long_id, long, why) in orders {
            if short >= long {
                let (s, l) = (humantime::format_duration(short), humantime::format_duration(long));
                problems.push(format!("{} ({s}) must be shorter than {} ({l}), or {why}", flag(short_id), flag(long_id)));
            }
        }
        problems.extend(check_database_url(&self.conn.database_url));
        for (var, token) in [("GE_ADMIN_TOKEN", &self.admin_token), ("GE_ADMIN_READ_TOKEN", &self.admin_read_token)] {
            match token.as_deref() {
                // An empty read token would leave the reads open, which whoever set it did not
                // mean; an empty admin token is as surely a mistake.
                Some(t) if t.trim().is_empty() => problems.push(format!("{var} is set but empty: give it a token, or unset it for none")),
                // A token from a file or a secret often ends in a newline. It is compared
                // trimmed, like the token a request presents.
                Some(t) if t.trim() != t => {
                    tracing::warn!("{var} has leading or trailing whitespace (a newline from a file?); it is ignored")
                }
                _ => {}
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(anyhow::anyhow!("invalid settings: {}", problems.join("; "))) }
    }

    /// What a trigger publication waits for: `--redis-wait-replicas`, or one replica when
    /// Redis is reached through Sentinel (a failover promotes a replica, and loses what it
    /// had not received).
    pub(crate) fn redis_confirm(&self) -> crate::engine::streams::Confirm {
        let sentinel = self.conn.redis_url.starts_with("redis+sentinel://") || self.conn.redis_url.starts_with("rediss+sentinel://");
        let replicas = self.redis_wait_replicas.unwrap_or(u32::from(sentinel));
        crate::engine::streams::Confirm { replicas, timeout: self.redis_wait_timeout }
    }

    /// How long a per-dispatch key lives: `--dispatch-key-ttl`, and never longer than the
    /// retention. A work package removed by retention and sent again starts over at attempt 1,
    /// with the dispatch_id it had the first time; its key must be gone by then, or the new
    /// trigger would be taken for a republication and never sent. The key is set at dispatch,
    /// before the work package finishes, so it expires before the row is removed.
    pub(crate) fn dispatch_key_lifetime(&self) -> Duration {
        match self.retention.retention.0 {
            Some(kept) => self.dispatch_key_ttl.min(kept),
            None => self.dispatch_key_ttl,
        }
    }

    pub(crate) fn consumer_name(&self) -> String {
        self.consumer.clone().unwrap_or_else(default_consumer_name)
    }
}

/// What is wrong with `DATABASE_URL`, if anything, in words that never repeat it (it holds a
/// password). sqlx takes a URL only; it logs the value of every query parameter it does not
/// know, so one that looks like a password is refused too.
fn check_database_url(url: &str) -> Option<String> {
    const FORM: &str = "postgres://user:password@host:port/database?sslmode=...";
    if !url.contains("://") {
        return Some(format!("DATABASE_URL must be a URL ({FORM}); a key/value conninfo (host=... password=...) is not accepted"));
    }
    if let Some((key, _)) =
        crate::core::redact::query_pairs(url).into_iter().find(|(k, _)| *k != "password" && k.to_ascii_lowercase().contains("pass"))
    {
        return Some(format!(
            "DATABASE_URL has a parameter {} that PostgreSQL's client here does not read (it would log its value); \
             the password goes in the userinfo or in password=",
            crate::core::entry::excerpt(key)
        ));
    }
    match url.parse::<sqlx::postgres::PgConnectOptions>() {
        Ok(_) => None,
        Err(e) => Some(format!(
            "DATABASE_URL cannot be read as a URL ({e}); write it as {FORM}, with special characters of the user \
             and password percent-encoded (@ as %40, / as %2F, ? as %3F, # as %23, % as %25)"
        )),
    }
}

pub(crate) fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// What is removed, and when (contract v1.3): finished work packages from PostgreSQL, entries
/// every reader is done with from the streams, and unread triggers past the operator's policy.
#[derive(clap::Args, Clone, Debug)]
pub struct Retention {
    /// How long a finished work package (completed, failed, cancelled) stays in PostgreSQL,
    /// with its edges and history, after it finished; `0` keeps them for ever.
    #[arg(long, env = "GE_RETENTION", default_value = "7days", value_parser = Period::parse)]
    pub retention: Period,
    /// The shortest retention this deployment accepts. The retention is also how long a
    /// dispatch key lives and how late a dependent may arrive: a replica stalled longer than it
    /// (a pause, a frozen VM) can send a trigger again, and a dependent sent longer after its
    /// prerequisite finished waits for ever. Lower it only where no stall lasts that long.
    #[arg(long, env = "GE_RETENTION_FLOOR", default_value = "1m", value_parser = duration_or_zero)]
    pub retention_floor: Duration,
    /// How often a replica removes what retention allows (one replica at a time).
    #[arg(long, env = "GE_RETENTION_INTERVAL", default_value = "10s", value_parser = duration)]
    pub retention_interval: Duration,
    /// Work packages removed per transaction: small, so no lock is held for long.
    #[arg(long, env = "GE_RETENTION_BATCH", default_value_t = 500)]
    pub retention_batch: u64,
    /// A trigger older than this is removed even when its agent has not read it; `off` keeps
    /// unread triggers for ever.
    #[arg(long, env = "GE_TRIGGER_MAX_AGE", default_value = "7days", value_parser = Period::parse)]
    pub trigger_max_age: Period,
    /// A trigger stream is cut to about this many entries, read or not; `off` for no cap.
    #[arg(long, env = "GE_TRIGGER_MAX_LEN", default_value = "off", value_parser = MaxLen::parse)]
    pub trigger_max_len: MaxLen,
    /// Per-agent trigger policies over the two above: `ada=30d,turing=1h/50000` (`AGE[/LEN]`,
    /// each part may be `off`).
    #[arg(long, env = "GE_TRIGGER_RETENTION", default_value = "", value_parser = AgentPolicies::parse)]
    pub trigger_retention: AgentPolicies,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            retention: Period(Some(Duration::from_secs(7 * 86_400))),
            retention_floor: Duration::from_secs(60),
            retention_interval: Duration::from_secs(10),
            retention_batch: 500,
            trigger_max_age: Period(Some(Duration::from_secs(7 * 86_400))),
            trigger_max_len: MaxLen(None),
            trigger_retention: AgentPolicies::default(),
        }
    }
}

impl Retention {
    /// The trigger policies in words, as `system.health` and `status` show them: the default,
    /// then each agent's own.
    pub fn describe_triggers(&self) -> String {
        let default = TriggerPolicy { max_age: self.trigger_max_age, max_len: self.trigger_max_len.0 };
        let mut out = format!("acknowledged removed; {default}");
        for (agent, p) in &self.trigger_retention.0 {
            out.push_str(&format!("; {agent}: {p}"));
        }
        out
    }

    /// The trigger policy of `agent`: its own, else the default.
    pub(crate) fn trigger_policy(&self, agent: &str) -> TriggerPolicy {
        self.trigger_retention
            .0
            .get(agent)
            .copied()
            .unwrap_or(TriggerPolicy { max_age: self.trigger_max_age, max_len: self.trigger_max_len.0 })
    }
}

/// `--flag (ENV)` of the setting whose field is `id`, as clap declares it, so messages cannot
/// drift from the flags.
fn flag(id: &str) -> String {
    use clap::Args;
    let cmd = RunSettings::augment_args(clap::Command::new("run"));
    match cmd.get_arguments().find(|a| a.get_id() == id) {
        Some(a) => {
            let long = a.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| id.to_string());
            match a.get_env() {
                Some(env) => format!("{long} ({})", env.to_string_lossy()),
                None => long,
            }
        }
        None => id.to_string(),
    }
}
