//! A highly available Redis and PostgreSQL on one machine, on free ports, for the failover test
//! and `chaos --topology ha`: a Redis master and replica watched by three Sentinels (Debian's
//! `redis-sentinel`), and a PostgreSQL primary with a synchronous standby behind a switchable
//! proxy. Faults are a kill -9 of the Redis master (the Sentinels promote the replica) and of
//! the PostgreSQL primary (the standby is promoted and the proxy switched to it, as an
//! operator, Patroni or CloudNativePG would).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::engine::streams;
use crate::tools::localstack::{self, LocalPostgres, PostgresOptions};
use crate::tools::proxy::TcpProxy;

/// The name the Sentinels know the master by.
pub const MASTER_NAME: &str = "ge";

/// What the Sentinels are told, and what CHAOS.md records: a master unreachable for 1 s is
/// down for each Sentinel, two agreeing make it objectively down and one of them fails it over.
pub const SENTINEL_SETTINGS: [(&str, &str); 4] =
    [("down-after-milliseconds", "1000"), ("failover-timeout", "2000"), ("parallel-syncs", "1"), ("quorum", "2")];

/// The data nodes' persistence and replication settings.
pub const REDIS_SETTINGS: [(&str, &str); 5] =
    [("appendonly", "yes"), ("appendfsync", "always"), ("save", "\"\""), ("repl-diskless-sync", "yes"), ("repl-diskless-sync-delay", "0")];

struct Proc {
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    sentinel: bool,
    child: Option<Child>,
}

impl Proc {
    fn launch(&mut self) -> anyhow::Result<()> {
        let bin = if self.sentinel { localstack::find_redis_sentinel()? } else { localstack::find_redis_server()? };
        let mut cmd = Command::new(&bin);
        cmd.arg(&self.conf).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        self.child = Some(localstack::spawn(cmd, libc::SIGKILL).with_context(|| format!("starting {}", bin.display()))?);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis master and replica (AOF, fsync always; a password) and three Sentinels.
pub struct RedisHa {
    dir: PathBuf,
    password: String,
    nodes: Vec<Proc>,
    sentinels: Vec<Proc>,
}

impl RedisHa {
    pub async fn start() -> anyhow::Result<RedisHa> {
        let dir = localstack::temp_dir()?;
        let password = format!("pw{:08x}", rand::random::<u32>());
        let mut ha = RedisHa { dir, password, nodes: Vec::new(), sentinels: Vec::new() };
        let master = localstack::free_port()?;
        for i in 0..2 {
            let port = if i == 0 { master } else { localstack::free_port()? };
            let data = ha.dir.join(format!("node-{port}"));
            std::fs::create_dir_all(&data)?;
            let mut conf = format!("port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n", data.display());
            for (k, v) in REDIS_SETTINGS {
                conf += &format!("{k} {v}\n");
            }
            conf += &format!("requirepass {0}\nmasterauth {0}\n", ha.password);
            if i > 0 {
                conf += &format!("replicaof 127.0.0.1 {master}\n");
            }
            let log = ha.dir.join(format!("node-{port}.log"));
            conf += &format!("logfile {}\n", log.display());
            let path = ha.dir.join(format!("node-{port}.conf"));
            std::fs::write(&path, conf)?;
            let mut p = Proc { port, conf: path, log, sentinel: false, child: None };
            p.launch()?;
            ha.nodes.push(p);
            ha.wait_answers(i).await?;
        }
        for _ in 0..3 {
            let port = localstack::free_port()?;
            let log = ha.dir.join(format!("sentinel-{port}.log"));
            let mut conf = format!("port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\nlogfile {}\n", ha.dir.display(), log.display());
            let quorum = SENTINEL_SETTINGS.iter().find(|(k, _)| *k == "quorum").map_or("2", |(_, v)| v);
            conf += &format!("sentinel monitor {MASTER_NAME} 127.0.0.1 {master} {quorum}\n");
            for (k, v) in SENTINEL_SETTINGS.iter().filter(|(k, _)| *k != "quorum") {
                conf += &format!("sentinel {k} {MASTER_NAME} {v}\n");
            }
            conf += &format!("sentinel auth-pass {MASTER_NAME} {}\n", ha.password);
            let path = ha.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(&path, conf)?;
            let mut p = Proc { port, conf: path, log, sentinel: true, child: None };
            p.launch()?;
            ha.sentinels.push(p);
        }
        // Ready when every Sentinel knows the master, the replica and the other Sentinels.
        let start = Instant::now();
        loop {
            let mut ready = true;
            for s in &ha.sentinels {
                let known = sentinel_info(s.port).await.unwrap_or_default();
                ready &= known.contains("status=ok") && known.contains("slaves=1") && known.contains("sentinels=3");
            }
            if ready && ha.replica_online().await {
                return Ok(ha);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the Sentinels did not come up:\n{}", localstack::log_tail(&ha.sentinels[0].log));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `redis+sentinel://:PASSWORD@127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/ge`: all a replica
    /// needs to know.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://:{}@{}/{MASTER_NAME}", self.password, hosts.join(","))
    }

    /// The URL of one data node (to look at it directly).
    pub fn node_url(&self, port: u16) -> String {
        format!("redis://:{}@127.0.0.1:{port}", self.password)
    }

    /// The master's port, as the first Sentinel that answers says.
    pub async fn master_port(&self) -> anyhow::Result<u16> {
        for s in &self.sentinels {
            if let Ok(port) = sentinel_master(s.port).await {
                return Ok(port);
            }
        }
        Err(anyhow!("no Sentinel answered"))
    }

    fn node(&mut self, port: u16) -> anyhow::Result<&mut Proc> {
        self.nodes.iter_mut().find(|n| n.port == port).ok_or_else(|| anyhow!("no Redis node on port {port}"))
    }

    /// kill -9 of the master; returns its port.
    pub async fn kill_master(&mut self) -> anyhow::Result<u16> {
        let port = self.master_port().await?;
        self.node(port)?.kill();
        Ok(port)
    }

    /// Waits until every Sentinel names a master other than `old`, and that node says it is
    /// the master; returns its port.
    pub async fn wait_promoted(&self, old: u16, timeout: Duration) -> anyhow::Result<u16> {
        let start = Instant::now();
        loop {
            let mut named = Vec::new();
            for s in &self.sentinels {
                named.push(sentinel_master(s.port).await.ok());
            }
            if let Some(Some(new)) = named.first().copied()
                && new != old
                && named.iter().all(|n| *n == Some(new))
                && role(&self.node_url(new)).await.as_deref() == Some("master")
            {
                return Ok(new);
            }
            if start.elapsed() > timeout {
                bail!("no Sentinel failover within {timeout:?} (they name {named:?}):\n{}", localstack::log_tail(&self.sentinels[0].log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the node on `port` again, from its AOF, as a replica of the master the Sentinels
    /// name now (its config says so before it starts), as an operator should bring back a
    /// failed master. Left to the Sentinels, it would come up as a master with its stale data
    /// and stay one for some seconds before they turn it into a replica (they wait for it to
    /// settle): seconds with no replica, in which no write can be confirmed, and in which a
    /// failover could promote the stale node and lose every write the other took since.
    /// Returns once it replicates, so that the next failover has a replica.
    pub async fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        let master = self.master_port().await?;
        let node = self.node(port)?;
        let conf = std::fs::read_to_string(&node.conf)?;
        let mut kept: String =
            conf.lines().filter(|l| !l.starts_with("replicaof ") && !l.starts_with("slaveof ")).map(|l| format!("{l}\n")).collect();
        kept += &format!("replicaof 127.0.0.1 {master}\n");
        std::fs::write(&node.conf, kept)?;
        node.launch()?;
        let start = Instant::now();
        while !self.replica_online().await {
            if start.elapsed() > Duration::from_secs(60) {
                let log = self.node(port).map(|n| n.log.clone())?;
                bail!("the node on port {port} did not come back as a replica:\n{}", localstack::log_tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Whether the master has an online replica that has caught up.
    async fn replica_online(&self) -> bool {
        let Ok(master) = self.master_port().await else { return false };
        let Ok(info) = info(&self.node_url(master), "replication").await else { return false };
        info.contains("role:master") && info.lines().any(|l| l.starts_with("slave0:") && l.contains("state=online"))
    }

    async fn wait_answers(&self, i: usize) -> anyhow::Result<()> {
        let start = Instant::now();
        while role(&self.node_url(self.nodes[i].port)).await.is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("redis-server did not start:\n{}", localstack::log_tail(&self.nodes[i].log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RedisHa {
    fn drop(&mut self) {
        self.sentinels.clear();
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connection(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    Ok(client.get_multiplexed_async_connection_with_config(&cfg).await?)
}

async fn sentinel_master(port: u16) -> anyhow::Result<u16> {
    let mut con = connection(&format!("redis://127.0.0.1:{port}")).await?;
    let (_, p) = streams::master_addr(&mut con, MASTER_NAME).await?.ok_or_else(|| anyhow!("the Sentinel knows no master"))?;
    Ok(p)
}

async fn sentinel_info(port: u16) -> anyhow::Result<String> {
    let mut con = connection(&format!("redis://127.0.0.1:{port}")).await?;
    Ok(streams::info(&mut con, "sentinel").await?)
}

async fn info(url: &str, section: &str) -> anyhow::Result<String> {
    let mut con = connection(url).await?;
    Ok(streams::info(&mut con, section).await?)
}

/// `master`, `slave` (or None when the node does not answer).
async fn role(url: &str) -> Option<String> {
    let mut con = connection(url).await.ok()?;
    streams::role(&mut con).await.ok().flatten()
}

/// The PostgreSQL settings of the pair, as CHAOS.md records them.
pub const POSTGRES_SETTINGS: [(&str, &str); 3] =
    [("synchronous_commit", "on"), ("synchronous_standby_names", "'*' (while a standby streams)"), ("wal_level", "replica")];

/// A PostgreSQL primary and its synchronous standby, reached through a proxy that a failover
/// switches to the promoted standby.
pub struct PostgresHa {
    primary: LocalPostgres,
    standby: Option<LocalPostgres>,
    proxy: TcpProxy,
}

impl PostgresHa {
    pub async fn start() -> anyhow::Result<PostgresHa> {
        let primary = LocalPostgres::start(PostgresOptions::default()).await?;
        let proxy = TcpProxy::start(primary.port()).await?;
        let mut ha = PostgresHa { primary, standby: None, proxy };
        ha.add_standby().await?;
        Ok(ha)
    }

    /// `CREATE DATABASE` on the primary; the URL goes through the proxy.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        self.primary.create_database(name).await?;
        Ok(format!("postgres://postgres@127.0.0.1:{}/{name}", self.proxy.port()))
    }

    /// A fresh standby from a base backup of the primary, made its synchronous standby: from
    /// then on a commit returns only once the standby has it.
    pub async fn add_standby(&mut self) -> anyhow::Result<()> {
        let standby = LocalPostgres::standby_of(&self.primary).await?;
        self.standby = Some(standby);
        self.primary.set_synchronous_standby(true).await?;
        let start = Instant::now();
        while !self.primary.has_sync_standby().await.unwrap_or(false) {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the standby did not become synchronous within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// kill -9 of the primary and every backend, the standby promoted, the proxy switched to
    /// it. Until `add_standby`, the new primary commits alone: it is told not to wait for a
    /// standby it does not have.
    pub async fn fail_over(&mut self) -> anyhow::Result<()> {
        let standby = self.standby.take().ok_or_else(|| anyhow!("no standby to promote"))?;
        self.primary.kill();
        standby.promote().await?;
        standby.set_synchronous_standby(false).await?;
        self.proxy.switch(standby.port());
        self.primary = standby;
        Ok(())
    }

    pub fn proxy_port(&self) -> u16 {
        self.proxy.port()
    }

    pub fn primary_port(&self) -> u16 {
        self.primary.port()
    }
}
