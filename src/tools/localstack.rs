//! Throwaway `redis-server` and `postgres` on free ports, for tests, benchmarks and `dev`.
//!
//! Children are spawned from one long-lived thread with PR_SET_PDEATHSIG, so they die with
//! this process even when it exits without running destructors (a test binary's statics) or
//! is killed: the signal fires when the *spawning thread* ends, so that thread must live as
//! long as the process.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

const SETUP_HINT: &str = "or run scripts/setup.sh";

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

static SPAWNER: LazyLock<Mutex<mpsc::Sender<SpawnRequest>>> = LazyLock::new(|| {
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("localstack-spawner".into())
        .spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            // Keep the thread (and so the children's parent-death signal) alive until exit.
            loop {
                std::thread::park();
            }
        })
        .expect("spawn the localstack spawner thread");
    Mutex::new(tx)
});

pub(crate) fn spawn(mut cmd: Command, death_signal: i32) -> anyhow::Result<Child> {
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    SPAWNER.lock().map_err(|_| anyhow!("spawner lock poisoned"))?.send((cmd, tx)).map_err(|_| anyhow!("spawner thread gone"))?;
    Ok(rx.recv().map_err(|_| anyhow!("spawner thread gone"))??)
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file())).unwrap_or(None)
}

pub(crate) fn find_redis_server() -> anyhow::Result<PathBuf> {
    on_path("redis-server")
        .or_else(|| ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].iter().map(PathBuf::from).find(|p| p.is_file()))
        .ok_or_else(|| {
            anyhow!("redis-server not found (looked in PATH, /usr/bin, /usr/local/bin). Install it with `apt-get install redis-server`, {SETUP_HINT}")
        })
}

/// Debian's `redis-sentinel` (package `redis-sentinel`).
pub(crate) fn find_redis_sentinel() -> anyhow::Result<PathBuf> {
    on_path("redis-sentinel")
        .or_else(|| ["/usr/bin/redis-sentinel", "/usr/local/bin/redis-sentinel"].iter().map(PathBuf::from).find(|p| p.is_file()))
        .ok_or_else(|| {
            anyhow!("redis-sentinel not found (looked in PATH, /usr/bin, /usr/local/bin). Install it with `apt-get install redis-sentinel`, {SETUP_HINT}")
        })
}

pub(crate) fn find_pg_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").is_file() && bin.join("initdb").is_file()).then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow!("PostgreSQL server binaries (postgres, initdb) not found (looked at `pg_config --bindir` and /usr/lib/postgresql/*/bin). Install them with `apt-get install postgresql`, {SETUP_HINT}")
    })
}

pub(crate) fn log_tail(path: &Path) -> String {
    let Ok(f) = std::fs::File::open(path) else { return String::from("(no log)") };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // The field after the parenthesised command name is the state, then the ppid.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn signal(child: &Option<Child>, sig: i32) {
    if let Some(c) = child {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, sig) };
    }
}

/// A temp dir `ge-orch-<pid>-<random>`; stale ones of dead processes are removed first.
pub(crate) fn temp_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("ge-orch-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok())
            && !alive(pid)
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = base.join(format!("ge-orch-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A server certificate and key (PEM), and the CA that signed it.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// appendonly with `appendfsync always`: data survives a restart.
    pub persistent: bool,
    pub password: Option<String>,
    /// Serve TLS only (`rediss://`), with this certificate.
    pub tls: Option<TlsFiles>,
}

pub struct LocalRedis {
    opts: RedisOptions,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl LocalRedis {
    pub async fn start(opts: RedisOptions) -> anyhow::Result<LocalRedis> {
        let dir = temp_dir()?;
        let mut last = None;
        for _ in 0..5 {
            let mut r = LocalRedis { opts: opts.clone(), port: free_port()?, dir: dir.clone(), child: None };
            match r.launch().await {
                Ok(()) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("redis-server did not start")))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let bin = find_redis_server()?;
        let log = self.dir.join("redis.log");
        let mut cmd = Command::new(&bin);
        match &self.opts.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca),
        };
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.opts.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(p) = &self.opts.password {
            cmd.args(["--requirepass", p]);
        }
        self.child = Some(spawn(cmd, libc::SIGKILL).with_context(|| format!("starting {}", bin.display()))?);
        let client = match &self.opts.tls {
            None => redis::Client::open(self.url()).context("redis url")?,
            Some(t) => {
                let root = std::fs::read(&t.ca).with_context(|| format!("reading {}", t.ca.display()))?;
                redis::Client::build_with_tls(self.url(), redis::TlsCertificates { client_tls: None, root_cert: Some(root) })
                    .context("redis url")?
            }
        };
        let start = Instant::now();
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && crate::engine::streams::ping(&mut c).await.is_ok()
            {
                return Ok(());
            }
            let exited = self.child.as_mut().map(|c| matches!(c.try_wait(), Ok(Some(_)))).unwrap_or(true);
            if exited || start.elapsed() > Duration::from_secs(10) {
                self.kill();
                bail!("redis-server on port {} did not start:\n{}", self.port, log_tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() { "rediss" } else { "redis" };
        match &self.opts.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The directory Redis keeps its AOF in (`appendonlydir/` under it).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// Stops it (gracefully, so an AOF is complete) and starts it again on the same port and dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        self.launch().await
    }
    pub fn pause(&self) {
        signal(&self.child, libc::SIGSTOP);
    }
    pub fn resume(&self) {
        signal(&self.child, libc::SIGCONT);
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone, Default)]
pub struct PostgresOptions {
    /// Serve TLS (ssl=on) with this certificate; plain connections stay possible.
    pub tls: Option<TlsFiles>,
    /// fsync and full_page_writes; off makes tests much faster and is still safe when only
    /// processes crash (the OS keeps what was written). synchronous_commit stays on always:
    /// off, a kill -9 loses commits already acknowledged, and the orchestrator acknowledges
    /// Redis entries on the strength of those commits.
    pub fsync: bool,
    /// `shared_buffers` in MB; 128 when not given. The benchmark's 200,000-package backlog
    /// does not fit in 128 MB, and then measures the page cache rather than the engine.
    pub shared_buffers_mb: Option<u32>,
}

pub struct LocalPostgres {
    opts: PostgresOptions,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// postgres refuses to run as root; then it runs as the `postgres` system user.
fn postgres_user() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres") && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .map(Some)
        .ok_or_else(|| anyhow!("running as root, but there is no `postgres` user to run PostgreSQL as; install postgresql ({SETUP_HINT})"))
}

fn chown_tree(path: &Path, ids: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// One initdb per process; further clusters copy it, which is much faster.
static TEMPLATE: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();

async fn template(bindir: &Path, ids: Option<(u32, u32)>) -> anyhow::Result<PathBuf> {
    TEMPLATE
        .get_or_try_init(|| async {
            let dir = temp_dir()?;
            chown_tree(&dir, ids)?;
            let data = dir.join("data");
            let mut cmd = tokio::process::Command::new(bindir.join("initdb"));
            cmd.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]);
            if let Some((uid, gid)) = ids {
                cmd.uid(uid).gid(gid);
            }
            let out = cmd.output().await.with_context(|| format!("running {}", bindir.join("initdb").display()))?;
            if !out.status.success() {
                bail!("initdb failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            }
            Ok(data)
        })
        .await
        .cloned()
}

impl LocalPostgres {
    pub async fn start(opts: PostgresOptions) -> anyhow::Result<LocalPostgres> {
        let bindir = find_pg_bindir()?;
        let ids = postgres_user()?;
        let template = template(&bindir, ids).await?;
        let dir = temp_dir()?;
        chown_tree(&dir, ids)?;
        let status = Command::new("cp").arg("-a").arg(&template).arg(dir.join("data")).status().context("copying the initdb template")?;
        if !status.success() {
            bail!("copying the initdb template {} failed", template.display());
        }
        std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o700))?;
        let mut last = None;
        for _ in 0..5 {
            let mut pg = LocalPostgres { opts: opts.clone(), port: free_port()?, dir: dir.clone(), child: None };
            match pg.launch().await {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("postgres did not start")))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let bindir = find_pg_bindir()?;
        let ids = postgres_user()?;
        let log = self.dir.join("postgres.log");
        let logfile = std::fs::File::create(&log).context("creating the postgres log")?;
        chown_tree(&log, ids)?;
        let onoff = if self.opts.fsync { "on" } else { "off" };
        let mut cmd = Command::new(bindir.join("postgres"));
        cmd.arg("-D").arg(self.dir.join("data")).arg("-p").arg(self.port.to_string()).arg("-k").arg(&self.dir);
        for setting in [
            format!("fsync={onoff}"),
            "synchronous_commit=on".into(),
            format!("full_page_writes={onoff}"),
            "max_connections=200".into(),
            format!("shared_buffers={}MB", self.opts.shared_buffers_mb.unwrap_or(128)),
            "listen_addresses=127.0.0.1".into(),
        ] {
            cmd.arg("-c").arg(setting);
        }
        if let Some(t) = &self.opts.tls {
            // postgres insists on a key readable by its own user only.
            for (src, name) in [(&t.cert, "server.crt"), (&t.key, "server.key")] {
                let dst = self.dir.join(name);
                std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))?;
                chown_tree(&dst, ids)?;
            }
            cmd.args(["-c", "ssl=on"]).arg("-c").arg(format!("ssl_cert_file={}", self.dir.join("server.crt").display()));
            cmd.arg("-c").arg(format!("ssl_key_file={}", self.dir.join("server.key").display()));
        }
        cmd.stdin(Stdio::null()).stdout(logfile.try_clone()?).stderr(logfile);
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        // SIGQUIT is postgres's immediate shutdown; its backends follow the postmaster.
        self.child = Some(spawn(cmd, libc::SIGQUIT).context("starting postgres")?);
        let start = Instant::now();
        loop {
            if sqlx::PgPool::connect(&self.url()).await.map(drop).is_ok() {
                return Ok(());
            }
            let exited = self.child.as_mut().map(|c| matches!(c.try_wait(), Ok(Some(_)))).unwrap_or(true);
            if exited || start.elapsed() > Duration::from_secs(30) {
                self.kill();
                bail!("postgres on port {} did not start:\n{}", self.port, log_tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    /// A streaming standby of `primary`, from `pg_basebackup` (its `-R` writes the standby's
    /// connection to the primary), on a port of its own.
    pub async fn standby_of(primary: &LocalPostgres) -> anyhow::Result<LocalPostgres> {
        let bindir = find_pg_bindir()?;
        let ids = postgres_user()?;
        let dir = temp_dir()?;
        chown_tree(&dir, ids)?;
        let mut cmd = tokio::process::Command::new(bindir.join("pg_basebackup"));
        cmd.arg("-D").arg(dir.join("data")).args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres"]);
        cmd.args(["-X", "stream", "-R", "-c", "fast", "--no-sync"]);
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().await.context("running pg_basebackup")?;
        if !out.status.success() {
            bail!("pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut last = None;
        for _ in 0..5 {
            let mut pg = LocalPostgres { opts: primary.opts.clone(), port: free_port()?, dir: dir.clone(), child: None };
            match pg.launch().await {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("the standby did not start")))
    }

    /// Makes this standby a primary (`pg_promote`, which waits until it is one).
    pub async fn promote(&self) -> anyhow::Result<()> {
        let pool = sqlx::PgPool::connect(&self.url()).await.context("connecting to the standby")?;
        let done: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)").fetch_one(&pool).await.context("promoting the standby")?;
        pool.close().await;
        if !done {
            bail!("the standby on port {} was not promoted within 60 s", self.port);
        }
        Ok(())
    }

    /// Commits wait for a synchronous standby (`synchronous_standby_names = '*'`), or not
    /// (empty), from the next transaction on.
    pub async fn set_synchronous_standby(&self, on: bool) -> anyhow::Result<()> {
        use sqlx::Executor;
        let pool = sqlx::PgPool::connect(&self.url()).await.context("connecting to the primary")?;
        let names = if on { "'*'" } else { "''" };
        pool.execute(sqlx::AssertSqlSafe(format!("ALTER SYSTEM SET synchronous_standby_names = {names}"))).await?;
        pool.execute("SELECT pg_reload_conf()").await?;
        pool.close().await;
        Ok(())
    }

    /// Whether a standby streams from this server and is its synchronous one.
    pub async fn has_sync_standby(&self) -> anyhow::Result<bool> {
        let pool = sqlx::PgPool::connect(&self.url()).await.context("connecting to the primary")?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        Ok(n > 0)
    }

    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        use sqlx::Executor;
        let pool = sqlx::PgPool::connect(&self.url()).await.context("connecting to the local postgres")?;
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
            .await
            .with_context(|| format!("creating database {name}"))?;
        pool.close().await;
        Ok(format!("postgres://postgres@127.0.0.1:{}/{name}", self.port))
    }
    /// A crash of the whole server: SIGKILL to the postmaster and every backend, so nothing
    /// keeps its shared memory and a restart can follow at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let backends = children_of(c.id());
            let _ = c.kill();
            for pid in backends {
                // SAFETY: plain kill(2) on a process of the server we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = c.wait();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.backends_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Whether any process still has this server's data dir open as its cwd (backends do).
    fn backends_alive(&self) -> bool {
        let data = self.dir.join("data");
        std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
            e.file_name().to_string_lossy().parse::<u32>().is_ok() && std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == data)
        })
    }
    /// Immediate shutdown and start again on the same port and data dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGQUIT) };
            let _ = c.wait();
        }
        // The old backends may hold the shared memory for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.backends_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.launch().await
    }
    pub fn pause(&self) {
        signal(&self.child, libc::SIGSTOP);
    }
    pub fn resume(&self) {
        signal(&self.child, libc::SIGCONT);
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGQUIT) };
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
