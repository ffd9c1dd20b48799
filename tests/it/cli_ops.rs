//! CLI parity with the admin API: `deadletter list|requeue`, `skip`, `agents`, `replicas`,
//! and `submit --wait` following a plan to its end.

use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{BIN, ROUTING, T, TestEnv, eventually};

fn cli(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", &env.database_url)
        .env("GE_ROUTING_CONFIG", &env.config)
        .output()
        .expect("run the CLI")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_requeues_dead_letters_and_skips() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("cli-1");
    env.submit(&[("wp_id", "c-ghost"), ("agent_id", "ghost")]).await;
    env.submit(&[("wp_id", "c-a"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "c-b"), ("agent_id", "dolly"), ("depends_on", "c-a")]).await;
    eventually(T, "the dead letter", || async { (!env.deadletters().await.is_empty()).then_some(()) }).await;

    let list = cli(&env, &["deadletter", "list"]);
    assert!(list.status.success() && stdout(&list).contains("unknown_agent") && stdout(&list).contains("c-ghost"), "{}", stdout(&list));
    let json: serde_json::Value = serde_json::from_slice(&cli(&env, &["deadletter", "list", "--json"]).stdout).unwrap();
    let id = json[0]["id"].as_str().unwrap().to_string();

    env.write_routing(&ROUTING.replace("agents:\n", "agents:\n  ghost:  { roles: [ops] }\n"));
    assert!(cli(&env, &["reload"]).status.success());
    // The reload is asynchronous: requeue once the new routing is in force, which the
    // dead-letter stream shows (a requeue under the old routing comes back as a new dead letter).
    eventually(T, "the requeued entry dispatched", || {
        let env = &env;
        async move {
            if let Some(d) = env.deadletters().await.last() {
                let again = cli(env, &["deadletter", "requeue", d["_id"].as_str()]);
                assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            env.triggers("ghost").await.into_iter().find(|t| t["wp_id"] == "c-ghost")
        }
    })
    .await;
    let gone = cli(&env, &["deadletter", "requeue", &id]);
    assert!(!gone.status.success(), "requeueing twice fails");
    let all = cli(&env, &["deadletter", "requeue", "--all"]);
    assert!(all.status.success() && stdout(&all).contains("no dead letters"), "{}", stdout(&all));

    let skip = cli(&env, &["skip", "c-a"]);
    assert!(skip.status.success(), "{}", String::from_utf8_lossy(&skip.stderr));
    eventually(T, "c-b dispatched after the skip", || async { (env.status("c-b").await.as_deref() == Some("dispatched")).then_some(()) })
        .await;

    let agents = stdout(&cli(&env, &["agents"]));
    assert!(agents.lines().any(|l| l.starts_with("dolly") && l.contains("1 / no cap")), "{agents}");
    let reps = eventually(T, "a heartbeat", || async { Some(stdout(&cli(&env, &["replicas"]))).filter(|s| s.contains("cli-1")) }).await;
    assert!(reps.contains("live"), "{reps}");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_follows_the_plan_to_its_end() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("cli-2");
    let plan = env.dir.path().join("plan.yaml");
    std::fs::write(&plan, "work_packages:\n  - { wp_id: one, agent_id: dolly }\n  - { wp_id: two, agent_id: dolly, depends_on: [one] }\n")
        .unwrap();
    // A stand-in agent: completes whatever reaches dolly.
    let agent = tokio::spawn({
        let env_con = env.con.clone();
        async move {
            let mut con = env_con;
            let mut done = std::collections::HashSet::new();
            loop {
                let v: redis::Value = redis::cmd("XRANGE").arg("triggers.dolly").arg("-").arg("+").query_async(&mut con).await.unwrap();
                for e in ge_orchestrator::engine::streams::parse_entries(&v) {
                    let f: std::collections::HashMap<String, String> = e
                        .fields
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
                        .collect();
                    if done.insert(f["dispatch_id"].clone()) {
                        let _: String = redis::cmd("XADD")
                            .arg("ge:work:completed")
                            .arg("*")
                            .arg("wp_id")
                            .arg(&f["wp_id"])
                            .arg("dispatch_id")
                            .arg(&f["dispatch_id"])
                            .query_async(&mut con)
                            .await
                            .unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let out = tokio::task::spawn_blocking({
        let (r, d, p) = (env.redis.url(), env.database_url.clone(), plan.clone());
        move || {
            Command::new(BIN)
                .args(["submit", "--wait", "--prefix", "w."])
                .arg(&p)
                .env("REDIS_URL", r)
                .env("DATABASE_URL", d)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    agent.abort();
    assert!(out.status.success(), "{}\n{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("plan finished: 2 completed"), "{}", stdout(&out));
    assert_eq!(env.status("w.two").await.as_deref(), Some("completed"));
    replica.stop().await;
}
