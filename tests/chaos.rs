//! The short chaos run: every fault kind injected into three replicas under load, and every
//! invariant must hold. The long run is documented in CHAOS.md.
//! Each run has an operator among the faults, cancelling recent work every 2 s on average.

use std::process::Command;

#[test]
fn short_chaos_run_keeps_every_invariant() {
    let out = Command::new(env!("CARGO_BIN_EXE_ge-orchestrator"))
        .args(["chaos", "--duration", "16s", "--fault-interval", "2s", "--rate", "40", "--replicas", "3"])
        .output()
        .expect("run chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chaos failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for fault in ["kill -9 + restart", "SIGSTOP", "Redis kill -9 + restart", "PostgreSQL kill -9 + restart"] {
        assert!(stdout.contains(fault), "{fault} was injected:\n{stdout}");
    }
    assert!(stdout.contains("all invariants held") && !stdout.contains("BROKEN"), "{stdout}");
    assert!(stdout.contains("operator cancels (v1.6)"), "an operator cancelled work:\n{stdout}");
}

/// The failover mode: two replicas on a Redis with Sentinels and a PostgreSQL with a
/// synchronous standby; a Redis master and a PostgreSQL primary are killed in turn, and every
/// invariant must hold and the work resume after each.
#[test]
fn short_failover_run_keeps_every_invariant() {
    let out = Command::new(env!("CARGO_BIN_EXE_ge-orchestrator"))
        .args(["chaos", "--topology", "ha", "--duration", "10s", "--fault-interval", "3s", "--rate", "40", "--replicas", "2"])
        .output()
        .expect("run chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chaos failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for fault in ["Redis master kill -9, Sentinel failover", "PostgreSQL primary kill -9, standby promoted"] {
        assert!(stdout.contains(fault), "{fault} was injected:\n{stdout}");
    }
    assert!(stdout.contains("all invariants held") && !stdout.contains("BROKEN") && !stdout.contains("NOT RESUMED"), "{stdout}");
}

/// The network faults (issue 19): every replica reaches Redis and PostgreSQL through proxies of
/// its own, which cut it from Redis briefly and past its lease, cut it from PostgreSQL, slow
/// both links and reset its connections mid-reply; every invariant must hold, by the agents'
/// history and by the orchestrator's tables.
#[test]
fn short_network_chaos_run_keeps_every_invariant() {
    let out = Command::new(env!("CARGO_BIN_EXE_ge-orchestrator"))
        .args(["chaos", "--faults", "redis-cut,postgres-cut,redis-partition,slow,reset", "--duration", "20s", "--fault-interval", "1s"])
        .args(["--rate", "40", "--replicas", "3"])
        .output()
        .expect("run chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chaos failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for fault in ["cut from Redis 1 s", "cut from Redis 5 s", "cut from PostgreSQL", "slow", "reset mid-reply"] {
        assert!(stdout.contains(fault), "{fault} was injected:\n{stdout}");
    }
    assert!(stdout.contains("by the agents' history") && stdout.contains("all invariants held") && !stdout.contains("BROKEN"), "{stdout}");
}
