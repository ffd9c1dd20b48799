//! Schedules (issue 21, contract v1.6): a cron schedule submits its plan once per firing, with a
//! prefix of its own, across replicas and a replica killed in between; firings missed while no
//! replica ran are skipped or the newest N caught up; a firing whose previous run is open is
//! skipped or started; pause and resume; a firing left unpublished is finished by a replica;
//! what operators see (API, CLI, `status`, metrics).

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ge_orchestrator::engine::schedule_store::{self, Definition};
use sqlx::PgPool;

use crate::harness::{BIN, ROUTING, Replica, T, TestEnv, eventually, http, http_get, http_settings, wait_ready};

/// Two work packages on dolly, the second after the first. No agent runs in these tests, so a
/// firing's run stays open (its work dispatched) unless a test completes it.
const PLAN: &str =
    "work_packages:\n  - wp_id: build\n    agent_id: dolly\n  - wp_id: check\n    agent_id: dolly\n    depends_on: [build]\n";
const ONE: &str = "work_packages:\n  - wp_id: tick\n    agent_id: dolly\n";
const EVERY_SECOND: &str = "* * * * * *";

fn define(cron: &str, missed: &str, overlap: &str, plan: &str) -> Definition {
    Definition {
        cron: cron.into(),
        timezone: "UTC".into(),
        plan: plan.into(),
        plan_source: Some("test.yaml".into()),
        missed: missed.into(),
        overlap: overlap.into(),
        paused: false,
    }
}

#[derive(Debug, Clone)]
struct Firing {
    fire_at: DateTime<Utc>,
    outcome: String,
    prefix: String,
    wp_ids: Vec<String>,
    decided_by: String,
    decided_at: DateTime<Utc>,
    published: bool,
}

/// A schedule's firings, oldest first.
async fn firings(pool: &PgPool, schedule: &str) -> Vec<Firing> {
    type Row = (DateTime<Utc>, String, String, Vec<String>, String, DateTime<Utc>, Option<DateTime<Utc>>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT fire_at, outcome, prefix, wp_ids, decided_by, decided_at, published_at FROM schedule_firings
         WHERE schedule = $1 ORDER BY fire_at",
    )
    .bind(schedule)
    .fetch_all(pool)
    .await
    .expect("read firings");
    rows.into_iter()
        .map(|(fire_at, outcome, prefix, wp_ids, decided_by, decided_at, published_at)| Firing {
            fire_at,
            outcome,
            prefix,
            wp_ids,
            decided_by,
            decided_at,
            published: published_at.is_some(),
        })
        .collect()
}

async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await.expect("the database's clock")
}

async fn stored(pool: &PgPool, prefix: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT wp_id FROM work_packages WHERE wp_id LIKE $1 ORDER BY wp_id")
        .bind(format!("{prefix}%"))
        .fetch_all(pool)
        .await
        .expect("read work packages")
}

/// Once its firings stop (paused), every firing is published and its work stored.
async fn settled(env: &TestEnv, schedule: &str) -> Vec<Firing> {
    schedule_store::set_paused(&env.pool, schedule, true).await.expect("pause").expect("the schedule exists");
    eventually(T, "every firing published and its work stored", || async {
        let all = firings(&env.pool, schedule).await;
        let want: usize = all.iter().map(|f| f.wp_ids.len()).sum();
        (all.iter().all(|f| f.published || f.outcome != "submitted") && stored(&env.pool, &format!("{schedule}-")).await.len() == want)
            .then_some(all)
    })
    .await
}

/// The issue's rule: a schedule firing once a minute, for three minutes, on two replicas
/// (processes), the replica that made the first firing killed with SIGKILL after it and
/// another started: each minute fires exactly once, its work packages are in PostgreSQL and
/// its entries in the stream exactly once, with the firing's prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minutely_schedule_fires_once_a_minute_across_two_replicas_and_a_kill() {
    let env = TestEnv::start(ROUTING).await;
    schedule_store::put(&env.pool, "minutely", &define("* * * * *", "skip", "start", PLAN), false).await.expect("add the schedule");
    let spawn = |name: &str| {
        let mut cmd = env.run_command(name, &["--block", "200ms"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd.spawn().expect("start a replica")
    };
    let mut replicas: HashMap<String, tokio::process::Child> = ["m1", "m2"].iter().map(|n| (n.to_string(), spawn(n))).collect();

    let first = eventually(Duration::from_secs(150), "the first firing published", || async {
        firings(&env.pool, "minutely").await.into_iter().find(|f| f.published)
    })
    .await;
    let mut victim = replicas.remove(&first.decided_by).expect("the firing names the replica that decided it");
    victim.kill().await.expect("SIGKILL the replica that fired");
    replicas.insert("m3".into(), spawn("m3"));

    eventually(Duration::from_secs(200), "three firings published", || async {
        (firings(&env.pool, "minutely").await.iter().filter(|f| f.published).count() >= 3).then_some(())
    })
    .await;
    let all = settled(&env, "minutely").await;

    assert!(all.len() >= 3, "{all:?}");
    for pair in all.windows(2) {
        assert_eq!(pair[1].fire_at - pair[0].fire_at, chrono::TimeDelta::minutes(1), "one firing a minute, none lost: {all:?}");
    }
    for f in &all {
        assert_eq!(f.outcome, "submitted");
        assert_eq!(f.prefix, format!("minutely-{}.", f.fire_at.format("%Y%m%dT%H%M%SZ")));
        assert_eq!(f.wp_ids, vec![format!("{}build", f.prefix), format!("{}check", f.prefix)]);
        assert_eq!(f.fire_at.timestamp_subsec_nanos(), 0);
    }
    for f in &all[1..] {
        assert_ne!(f.decided_by, first.decided_by, "the killed replica decided nothing after its death");
    }
    // PostgreSQL: exactly the firings' work packages.
    let mut want: Vec<String> = all.iter().flat_map(|f| f.wp_ids.clone()).collect();
    want.sort();
    assert_eq!(stored(&env.pool, "minutely-").await, want);
    // The stream: each entry once, naming its schedule, firing and plan.
    let entries: Vec<HashMap<String, String>> =
        env.entries("ge:work:incoming").await.into_iter().filter(|e| e.get("wp_id").is_some_and(|w| w.starts_with("minutely-"))).collect();
    let mut sent: Vec<String> = entries.iter().map(|e| e["wp_id"].clone()).collect();
    sent.sort();
    assert_eq!(sent, want, "every firing's entries exactly once in ge:work:incoming");
    for e in &entries {
        let f = all.iter().find(|f| e["wp_id"].starts_with(&f.prefix)).expect("an entry of a firing");
        assert_eq!(e["schedule"], "minutely");
        assert_eq!(e["scheduled_for"], f.fire_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        assert_eq!(e["plan"], f.prefix.trim_end_matches('.'));
    }
    for (_, mut r) in replicas {
        let _ = r.kill().await;
    }
}

/// With every replica stopped across several firings of a per-second schedule, the first
/// round after a restart submits the newest firing (on time) and, under `catch_up:2`, the two
/// missed firings before it; `skip` submits none of the missed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_firings_are_skipped_or_the_newest_n_caught_up() {
    let env = TestEnv::start(ROUTING).await;
    schedule_store::put(&env.pool, "skipper", &define(EVERY_SECOND, "skip", "start", ONE), false).await.unwrap();
    schedule_store::put(&env.pool, "catcher", &define(EVERY_SECOND, "catch_up:2", "start", ONE), false).await.unwrap();
    let replica = env.replica("p1");
    eventually(T, "both schedules fired twice", || async {
        let (a, b) = (firings(&env.pool, "skipper").await, firings(&env.pool, "catcher").await);
        (a.len() >= 2 && b.len() >= 2).then_some(())
    })
    .await;
    replica.stop().await;
    let last = |all: Vec<Firing>| all.last().map(|f| f.fire_at).expect("a firing");
    let (last_skipper, last_catcher) = (last(firings(&env.pool, "skipper").await), last(firings(&env.pool, "catcher").await));
    let stopped = last_skipper.max(last_catcher);
    eventually(T, "six firings' time with no replica running", || async {
        (db_now(&env.pool).await >= stopped + chrono::TimeDelta::seconds(6)).then_some(())
    })
    .await;
    let replica = env.replica("p2");
    eventually(T, "both fired again", || async {
        let (a, b) = (firings(&env.pool, "skipper").await, firings(&env.pool, "catcher").await);
        (a.last()?.fire_at > last_skipper && b.last()?.fire_at > last_catcher).then_some(())
    })
    .await;
    let skipper = settled(&env, "skipper").await;
    let catcher = settled(&env, "catcher").await;
    replica.stop().await;

    // The first decision after the restart, per schedule: the firings it recorded together.
    let first_after = |all: &[Firing], last: DateTime<Utc>| -> Vec<Firing> {
        let after: Vec<&Firing> = all.iter().filter(|f| f.fire_at > last).collect();
        let at = after.iter().map(|f| f.decided_at).min().expect("firings after the restart");
        let batch: Vec<Firing> = after.iter().filter(|f| f.decided_at == at).map(|f| (*f).clone()).collect();
        assert_eq!(after[0].fire_at, batch[0].fire_at, "nothing older than the first decision after the restart");
        batch
    };
    let s = first_after(&skipper, last_skipper);
    assert_eq!(s.len(), 1, "skip: only the on-time firing, {s:?}");
    assert!(s[0].fire_at - last_skipper >= chrono::TimeDelta::seconds(5), "skip: the missed ones were not submitted, {s:?}");
    let c = first_after(&catcher, last_catcher);
    assert_eq!(c.len(), 3, "catch_up:2: the two newest missed firings and the on-time one, {c:?}");
    assert_eq!(c[1].fire_at - c[0].fire_at, chrono::TimeDelta::seconds(1));
    assert_eq!(c[2].fire_at - c[1].fire_at, chrono::TimeDelta::seconds(1));
    assert!(c[0].fire_at - last_catcher >= chrono::TimeDelta::seconds(3), "catch_up:2: older missed firings skipped, {c:?}");
    for f in skipper.iter().chain(&catcher) {
        assert_eq!(f.outcome, "submitted");
    }
}

/// `overlap: skip`: while the first firing's work is dispatched and unreported, every later
/// firing is recorded as skipped; once it completes, the next firing runs. `overlap: start`
/// submits every firing, runs open or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_whose_previous_run_is_open_is_skipped_or_started_by_policy() {
    let env = TestEnv::start(ROUTING).await;
    schedule_store::put(&env.pool, "single", &define(EVERY_SECOND, "skip", "skip", ONE), false).await.unwrap();
    schedule_store::put(&env.pool, "many", &define(EVERY_SECOND, "skip", "start", ONE), false).await.unwrap();
    let replica = env.replica("o1");
    eventually(T, "three firings skipped while the first run is open", || async {
        let all = firings(&env.pool, "single").await;
        (all.iter().filter(|f| f.outcome == "skipped_overlap").count() >= 3).then_some(())
    })
    .await;
    let first = firings(&env.pool, "single").await.into_iter().next().expect("the first firing");
    assert_eq!(first.outcome, "submitted");
    let wp = first.wp_ids[0].clone();
    let trigger = eventually(T, "the first run's trigger", || async {
        env.triggers("dolly").await.into_iter().find(|t| t.get("wp_id") == Some(&wp))
    })
    .await;
    env.complete(&trigger).await;
    eventually(T, "the next firing submitted once the run completed", || async {
        (firings(&env.pool, "single").await.iter().filter(|f| f.outcome == "submitted").count() >= 2).then_some(())
    })
    .await;
    let single = settled(&env, "single").await;
    let many = settled(&env, "many").await;
    replica.stop().await;

    let second = single.iter().skip(1).position(|f| f.outcome == "submitted").expect("a second submitted firing") + 1;
    assert!(second >= 4, "{single:?}");
    assert!(single[1..second].iter().all(|f| f.outcome == "skipped_overlap" && f.wp_ids.is_empty()), "{single:?}");
    let completed_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT completed_at FROM work_packages WHERE wp_id = $1").bind(&wp).fetch_one(&env.pool).await.unwrap();
    assert!(
        single[second].decided_at >= completed_at - chrono::TimeDelta::seconds(1),
        "the next run started only after the first finished"
    );
    assert!(single[1..second].iter().all(|f| f.decided_at <= completed_at + chrono::TimeDelta::seconds(1)));
    assert!(many.len() >= 3 && many.iter().all(|f| f.outcome == "submitted"), "{many:?}");
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE wp_id LIKE 'many-%' AND status <> 'completed'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(open >= 3, "start: runs overlapped ({open} open at once)");
}

/// A firing recorded by a replica that died before Redis took its entries is published by
/// another replica, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_recorded_but_not_published_is_published_by_another_replica() {
    let env = TestEnv::start(ROUTING).await;
    schedule_store::put(&env.pool, "orphaned", &define("0 0 1 1 *", "skip", "start", ONE), false).await.unwrap();
    let wp = "orphaned-20260101T000000Z.tick";
    sqlx::query(
        "INSERT INTO schedule_firings (schedule, fire_at, outcome, prefix, wp_ids, entries, decided_by, decided_at)
         VALUES ('orphaned', '2026-01-01T00:00:00Z', 'submitted', 'orphaned-20260101T000000Z.', ARRAY[$1],
                 jsonb_build_array(jsonb_build_array(jsonb_build_array('wp_id', $1::text), jsonb_build_array('agent_id', 'dolly'))),
                 'a-replica-that-died', now() - interval '1 minute')",
    )
    .bind(wp)
    .execute(&env.pool)
    .await
    .unwrap();
    let replica = env.replica("u1");
    eventually(T, "the orphaned firing published and its work stored", || async {
        let f = firings(&env.pool, "orphaned").await;
        (f[0].published && env.status(wp).await.is_some()).then_some(())
    })
    .await;
    replica.stop().await;
    let sent = env.entries("ge:work:incoming").await.into_iter().filter(|e| e.get("wp_id").map(String::as_str) == Some(wp)).count();
    assert_eq!(sent, 1);

    // Firings are kept 100 per schedule, and always its newest submitted one (the overlap rule
    // reads it), here older than 150 skipped ones; an unpublished one is never removed.
    sqlx::query(
        "INSERT INTO schedule_firings (schedule, fire_at, outcome, prefix, wp_ids, entries, decided_by, published_at)
         SELECT 'orphaned', '2026-02-01T00:00:00Z'::timestamptz + make_interval(mins => i), 'skipped_overlap', 'p.', '{}', '[]', 'x', NULL
         FROM generate_series(1, 150) AS i",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO schedule_firings (schedule, fire_at, outcome, prefix, wp_ids, entries, decided_by, published_at)
         VALUES ('orphaned', '2025-06-01T00:00:00Z', 'submitted', 'p.', '{}', '[]', 'x', NULL)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    schedule_store::prune(&env.pool).await.unwrap();
    let left = firings(&env.pool, "orphaned").await;
    assert_eq!(left.len(), 102, "100 newest, the newest submitted one, the unpublished one");
    assert!(left.iter().any(|f| f.fire_at.to_rfc3339().starts_with("2026-01-01")), "the newest submitted firing is kept");
    assert!(left.iter().any(|f| f.fire_at.to_rfc3339().starts_with("2025-06-01")), "an unpublished firing is kept");
    assert_eq!(left.iter().filter(|f| f.outcome == "skipped_overlap").count(), 100);
}

const TOKEN: &str = "schedule-token";

/// Through the admin API: a bad plan is refused naming its line and column; pause holds a
/// schedule's firings (another schedule's firings are the clock), resume fires it again at its
/// next firing without catching up what came due meanwhile; list, metrics, remove.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_what_operators_see_through_the_api() {
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "a1", Some(TOKEN));
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    let body = |plan: &str, missed: &str| {
        serde_json::json!({ "cron": EVERY_SECOND, "plan": plan, "plan_source": "held.yaml", "missed": missed }).to_string()
    };
    let (code, answer) =
        http(port, "PUT", "/api/schedules/held", Some(TOKEN), Some(&body("work_packages:\n  - wp_id: a\n    colour: red\n", "skip"))).await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().starts_with("held.yaml:3:"), "{answer}");
    let (code, _) = http(port, "PUT", "/api/schedules/held", None, Some(&body(ONE, "skip"))).await;
    assert_eq!(code, 401);
    let (code, answer) = http(port, "PUT", "/api/schedules/held", Some(TOKEN), Some(&body(ONE, "catch_up:5"))).await;
    assert_eq!((code, answer["replaced"].as_bool()), (200, Some(false)), "{answer}");
    let (code, _) = http(port, "PUT", "/api/schedules/clock", Some(TOKEN), Some(&body(ONE, "skip"))).await;
    assert_eq!(code, 200);
    eventually(T, "held fired", || async { (!firings(&env.pool, "held").await.is_empty()).then_some(()) }).await;

    let (code, answer) = http(port, "POST", "/api/schedules/held/pause", Some(TOKEN), None).await;
    assert_eq!((code, answer["paused"].as_bool(), answer["next_firing"].is_null()), (200, Some(true), true), "{answer}");
    let paused_at = db_now(&env.pool).await;
    let held_while_paused = firings(&env.pool, "held").await.len();
    eventually(T, "three firings of the other schedule", || async {
        let clock = firings(&env.pool, "clock").await;
        (clock.iter().filter(|f| f.fire_at > paused_at).count() >= 3).then_some(())
    })
    .await;
    assert_eq!(firings(&env.pool, "held").await.len(), held_while_paused, "no firing while paused");

    let (code, answer) = http(port, "POST", "/api/schedules/held/resume", Some(TOKEN), None).await;
    assert_eq!((code, answer["paused"].as_bool()), (200, Some(false)), "{answer}");
    let resumed_at = db_now(&env.pool).await;
    let next: DateTime<Utc> = answer["next_firing"].as_str().unwrap().parse().unwrap();
    assert!(next > resumed_at - chrono::TimeDelta::seconds(1));
    eventually(T, "held fires again", || async { (firings(&env.pool, "held").await.len() > held_while_paused).then_some(()) }).await;
    let late = firings(&env.pool, "held").await;
    assert!(
        late[held_while_paused..].iter().all(|f| f.fire_at >= resumed_at - chrono::TimeDelta::seconds(1)),
        "what came due while paused is not caught up: {late:?}"
    );

    let (code, list) = http(port, "GET", "/api/schedules", None, None).await;
    assert_eq!(code, 200);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["clock", "held"]);
    assert!(list[0]["next_firing"].is_string() && list[0]["last_prefix"].as_str().unwrap().starts_with("clock-"), "{list}");
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    assert!(metrics.contains(r#"ge_schedule_firings_total{schedule="clock",outcome="submitted"}"#), "{metrics}");
    assert!(metrics.contains(r#"ge_schedule_next_firing_seconds{schedule="clock"}"#), "{metrics}");
    assert!(metrics.contains(r#"ge_schedule_paused{schedule="held"} 0"#), "{metrics}");

    assert_eq!(http(port, "DELETE", "/api/schedules/clock", Some(TOKEN), None).await.0, 200);
    assert_eq!(http(port, "DELETE", "/api/schedules/clock", Some(TOKEN), None).await.0, 404);
    assert_eq!(http(port, "POST", "/api/schedules/bad.name/pause", Some(TOKEN), None).await.0, 400);
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    assert!(!metrics.contains(r#"ge_schedule_next_firing_seconds{schedule="clock"}"#), "a removed schedule leaves no gauge");
    replica.stop().await;
}

/// The command line: `schedule add` checks the plan (file, line, column), `status` and
/// `schedule list` show the next firing, pause, resume and remove.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_commands_and_status() {
    let env = TestEnv::start(ROUTING).await;
    let bad = env.dir.path().join("bad.yaml");
    std::fs::write(&bad, "work_packages:\n  - wp_id: ok\n  - wp_id: ok\n").unwrap();
    let good = env.dir.path().join("good.yaml");
    std::fs::write(&good, PLAN).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).env("DATABASE_URL", &env.database_url).output().expect("run the CLI");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let bad_s = bad.display().to_string();
    let (ok, out) = run(&["schedule", "add", "nightly", "--cron", "0 2 * * *", "--plan", &bad_s]);
    assert!(!ok && out.contains(&format!("{bad_s}:3:")) && out.contains("twice"), "{out}");
    let (ok, out) =
        run(&["schedule", "add", "nightly", "--cron", "0 2 * * *", "--timezone", "Mars/Base", "--plan", &good.display().to_string()]);
    assert!(!ok && out.contains("time zone"), "{out}");
    let good_s = good.display().to_string();
    // 02:00 in Berlin, in UTC: 01:00 in winter, 00:00 in summer.
    let berlin = ge_orchestrator::core::schedule::Timing::parse("0 2 * * *", "Europe/Berlin").unwrap();
    let next = berlin.next_after(Utc::now()).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (ok, out) = run(&[
        "schedule",
        "add",
        "nightly",
        "--cron",
        "0 2 * * *",
        "--timezone",
        "Europe/Berlin",
        "--plan",
        &good_s,
        "--missed",
        "catch_up:1",
    ]);
    assert!(ok && out.contains(&format!("added schedule nightly; next firing: {next}")), "{out}");
    let (ok, out) = run(&["schedule", "add", "nightly", "--cron", "0 3 * * *", "--plan", &good_s]);
    assert!(!ok && out.contains("exists"), "{out}");
    let (ok, out) = run(&["status"]);
    assert!(ok && out.contains("SCHEDULE") && out.contains("nightly") && out.contains(&next) && out.contains("missed=catch_up:1"), "{out}");
    let (ok, out) = run(&["schedule", "pause", "nightly"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["schedule", "list"]);
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, out) = run(&["schedule", "resume", "nightly"]);
    assert!(ok && out.contains("next firing"), "{out}");
    let (ok, out) = run(&["schedule", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert!(ok && list[0]["name"] == "nightly" && list[0]["paused"] == false, "{out}");
    let (ok, _) = run(&["schedule", "remove", "nightly"]);
    assert!(ok);
    let (ok, out) = run(&["schedule", "remove", "nightly"]);
    assert!(!ok && out.contains("no schedule"), "{out}");
    let left: HashSet<String> = schedule_store::list(&env.pool).await.unwrap().into_iter().map(|s| s.name).collect();
    assert!(left.is_empty());
}
