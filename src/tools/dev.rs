//! `ge-orchestrator dev`: the whole system on one machine. Starts Redis and PostgreSQL unless
//! URLs are given, two replicas and one demo agent per enabled agent of the routing file,
//! submits a plan and prints each transition as it happens until the plan is done.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::core::routing_file;
use crate::engine::{store, streams};
use crate::ops::reads;
use crate::tools::localstack::{LocalPostgres, LocalRedis, PostgresOptions, RedisOptions};
use crate::tools::plan;

#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Use this Redis instead of starting one.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Use this PostgreSQL instead of starting one.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long = "config", env = "GE_ROUTING_CONFIG", default_value = "config/dolly-routing.yaml")]
    pub config: PathBuf,
    #[arg(long, default_value = "examples/plan.yaml")]
    pub plan: PathBuf,
    /// The plan of the sample schedule `every-minute` (v1.6), which fires once a minute.
    #[arg(long, default_value = "examples/scheduled.yaml")]
    pub schedule_plan: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Shell command each demo agent runs per trigger.
    /// (v1.6) It also writes some made-up usage to `$GE_USAGE_FILE`, so that spend shows.
    #[arg(
        long,
        default_value = "sleep 0.$(( $(od -An -N1 -tu1 /dev/urandom) % 8 + 2 )); n=$(od -An -N1 -tu1 /dev/urandom | tr -d ' '); \
                         printf 'input_tokens=%s\\noutput_tokens=%s\\ncost=0.0%03d\\nmodel=demo-1\\n' $((n * 10)) $((n * 2)) $n > \"$GE_USAGE_FILE\"; \
                         echo \"done $GE_WP_ID\""
    )]
    pub agent_command: String,
    /// Stop the stack once the plan has finished instead of running until Ctrl-C.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Where replica and agent logs go.
    #[arg(long, default_value = ".dev")]
    pub log_dir: PathBuf,
}

struct Stack {
    children: Vec<(String, Child)>,
    _redis: Option<LocalRedis>,
    _postgres: Option<LocalPostgres>,
}

impl Stack {
    /// The first child that exited, with the end of its log, so a crash is not a silent hang.
    fn exited(&mut self, log_dir: &std::path::Path) -> Option<String> {
        for (name, c) in &mut self.children {
            if let Ok(Some(status)) = c.try_wait() {
                let log = std::fs::read_to_string(log_dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Some(format!("{name} exited with {status}; the end of its log:\n{}", tail.join("\n")));
            }
        }
        None
    }

    async fn stop(&mut self) {
        for (_, c) in &self.children {
            if let Some(pid) = c.id() {
                // SIGTERM lets replicas drain and leave the group.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for (name, c) in &mut self.children {
            match tokio::time::timeout(Duration::from_secs(15), c.wait()).await {
                Ok(Ok(s)) if !s.success() => eprintln!("  {name} exited with {s}"),
                Ok(_) => {}
                Err(_) => {
                    eprintln!("  {name} did not stop in 15 s; killing it");
                    let _ = c.kill().await;
                }
            }
        }
    }
}

fn spawn(log_dir: &std::path::Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(String, Child)> {
    let exe = std::env::current_exe().context("locating the ge-orchestrator binary")?;
    let log = std::fs::File::create(log_dir.join(format!("{name}.log"))).with_context(|| format!("creating the log of {name}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    Ok((name.to_string(), child))
}

pub async fn run(args: DevArgs, token: CancellationToken) -> anyhow::Result<ExitCode> {
    let routing = routing_file::load(&args.config)?;
    let plan = plan::Plan::load(&args.plan)?;
    std::fs::create_dir_all(&args.log_dir).with_context(|| format!("creating {}", args.log_dir.display()))?;

    let (redis_url, local_redis) = match &args.redis_url {
        Some(u) => (u.clone(), None),
        None => {
            let r = LocalRedis::start(RedisOptions::default()).await?;
            println!("started redis-server at {}", r.url());
            (r.url(), Some(r))
        }
    };
    let (database_url, local_pg) = match &args.database_url {
        Some(u) => (u.clone(), None),
        None => {
            let p = LocalPostgres::start(PostgresOptions::default()).await?;
            println!("started postgres at {}", p.url());
            (p.url(), Some(p))
        }
    };
    let config_path = args.config.to_string_lossy().to_string();
    // The dashboard's actions need a token; a local stack makes one up unless given one.
    let admin_token =
        std::env::var("GE_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| format!("dev-{:016x}", rand::random::<u64>()));
    let env = [
        ("REDIS_URL", redis_url.as_str()),
        ("DATABASE_URL", database_url.as_str()),
        ("GE_ROUTING_CONFIG", config_path.as_str()),
        ("GE_ADMIN_TOKEN", admin_token.as_str()),
    ];
    // Migrations first, so the replicas and this view agree on the schema from the start.
    let pool = store::connect(&database_url, 2).await?;

    let mut stack = Stack { children: Vec::new(), _redis: local_redis, _postgres: local_pg };
    let mut ports = Vec::new();
    for i in 1..=args.replicas {
        let name = format!("replica-{i}");
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).context("finding a free port")?;
        let http = format!("127.0.0.1:{port}");
        let settings = ["run", "--consumer", name.as_str(), "--block", "1s", "--log-format", "json", "--http-addr", http.as_str()];
        stack.children.push(spawn(&args.log_dir, &name, &settings, &env)?);
        ports.push(format!("http://{http}/"));
    }
    for (agent, spec) in &routing.agents {
        if !spec.enabled {
            continue;
        }
        let name = format!("agent-{agent}");
        let a = ["agent", agent.as_str(), "--", "sh", "-c", args.agent_command.as_str()];
        stack.children.push(spawn(&args.log_dir, &name, &a, &env)?);
    }
    println!(
        "{} replicas and {} demo agents running; logs in {}/",
        args.replicas,
        stack.children.len() - args.replicas,
        args.log_dir.display()
    );
    println!("dashboards (also /metrics, /api): {}", ports.join("  "));
    println!("admin token for the dashboard's actions: {admin_token}");

    let prefix = format!("run{}.", chrono::Utc::now().format("%H%M%S"));
    let plan = plan.with_prefix(&prefix);
    let mut con = streams::connect(&redis_url).await?;
    plan::submit(&mut con, &crate::engine::settings::Names::default().incoming, &plan).await.context("submitting the plan")?;
    println!("submitted {} work packages of {} (wp_ids prefixed {prefix})\n", plan.work_packages.len(), args.plan.display());

    add_sample_schedule(&pool, &args.schedule_plan).await?;

    let code = watch(&pool, &plan.wp_ids(), &token, &mut stack, &args.log_dir).await;
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error while watching: {e:#}");
            ExitCode::FAILURE
        }
    };
    // (v1.6) What the plan cost, as `status` shows it.
    match crate::engine::budgets::overview(&pool, Some(&routing), 0.8, 10).await {
        Ok(o) => print!("{}", crate::ops::status::render_spend(&o)),
        Err(e) => eprintln!("cannot read the spend: {e}"),
    }
    if !args.exit_when_done && !token.is_cancelled() {
        println!("\nthe stack keeps running (REDIS_URL={redis_url} DATABASE_URL={database_url}); Ctrl-C stops it");
        watch_schedules(&pool, &token).await;
    }
    println!("stopping the stack");
    stack.stop().await;
    Ok(code)
}

/// Prints every status change of the plan's work packages until all are finished.
async fn watch(
    pool: &sqlx::PgPool,
    ids: &[String],
    token: &CancellationToken,
    stack: &mut Stack,
    log_dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut last: HashMap<String, String> = HashMap::new();
    let deadline = Duration::from_secs(300);
    loop {
        let views = reads::work_packages(pool, None, 100_000).await?;
        let mut finished = 0;
        let mut failed = 0;
        for v in views.iter().filter(|v| ids.contains(&v.wp_id)) {
            if matches!(v.status.as_str(), "completed" | "failed" | "cancelled") {
                finished += 1;
            }
            if v.status == "failed" {
                failed += 1;
            }
            if last.get(&v.wp_id) != Some(&v.status) {
                let t = started.elapsed().as_secs_f64();
                let detail = match v.status.as_str() {
                    "dispatched" => format!("-> {} (attempt {})", v.agent_id.as_deref().unwrap_or("?"), v.attempts),
                    _ => v.why.clone(),
                };
                let lane = v.lane.as_deref().map(|l| format!("[{l}] ")).unwrap_or_default();
                println!("{t:7.2}s  {:<28} {:<10} {lane}{detail}", v.wp_id, v.status);
                last.insert(v.wp_id.clone(), v.status.clone());
            }
        }
        if finished == ids.len() {
            println!("\nplan finished in {:.1} s: {} completed, {failed} failed", started.elapsed().as_secs_f64(), finished - failed);
            return Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        if let Some(crash) = stack.exited(log_dir) {
            anyhow::bail!("{crash}");
        }
        if started.elapsed() > deadline {
            println!("\nplan not finished after {} s; see `ge-orchestrator status`", deadline.as_secs());
            return Ok(ExitCode::FAILURE);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = token.cancelled() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// The sample schedule: `schedule_plan` every minute, so that a new user sees a firing.
async fn add_sample_schedule(pool: &sqlx::PgPool, schedule_plan: &std::path::Path) -> anyhow::Result<()> {
    use crate::engine::schedule_store::{self, Definition};
    let text = std::fs::read_to_string(schedule_plan).with_context(|| format!("reading {}", schedule_plan.display()))?;
    let def = Definition {
        cron: "* * * * *".into(),
        timezone: "UTC".into(),
        plan: text,
        plan_source: Some(schedule_plan.display().to_string()),
        missed: "skip".into(),
        overlap: "skip".into(),
        paused: false,
    };
    schedule_store::put(pool, "every-minute", &def, true).await?;
    let next = schedule_store::list(pool).await?.into_iter().find(|s| s.name == "every-minute").and_then(|s| s.next_firing);
    println!(
        "schedule every-minute submits {} once a minute; next firing {} (`ge-orchestrator schedule list`)\n",
        schedule_plan.display(),
        next.map(|t| t.format("%H:%M:%S UTC").to_string()).unwrap_or_default()
    );
    Ok(())
}

/// Prints each firing of a schedule until `token` is cancelled.
async fn watch_schedules(pool: &sqlx::PgPool, token: &CancellationToken) {
    let mut seen: HashMap<String, Option<chrono::DateTime<chrono::Utc>>> = HashMap::new();
    loop {
        if let Ok(all) = crate::engine::schedule_store::list(pool).await {
            for s in all {
                let before = seen.insert(s.name.clone(), s.last_firing);
                if before.is_some_and(|b| b != s.last_firing) {
                    let outcome = s.last_outcome.as_deref().unwrap_or("?");
                    let prefix = s.last_prefix.as_deref().unwrap_or("");
                    println!("schedule {} fired ({outcome}): its work packages are {prefix}*", s.name);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = token.cancelled() => return,
        }
    }
}
