//! Replicas as child processes of this binary, for the chaos harness and the benchmark: each
//! gets its own consumer name and log file, and can be signalled, restarted and measured.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::engine::input::Input;
use crate::engine::settings::Names;
use crate::engine::streams;

pub(crate) struct ReplicaProcs {
    exe: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    dir: PathBuf,
    prefix: String,
    procs: Vec<(String, Child)>,
    generation: usize,
    /// Variables of one slot only, over `env` (a replica's own proxies).
    slot_env: std::collections::HashMap<usize, Vec<(String, String)>>,
}

impl ReplicaProcs {
    /// `args` come after `run --consumer NAME`; `env` carries REDIS_URL, DATABASE_URL and the
    /// routing file. Logs go to `dir/NAME.log`. The replicas run this binary, or the one
    /// `GE_REPLICA_BIN` names: another build's engine, measured by this build's tools in one
    /// sitting (BENCHMARKS.md, before and after).
    pub fn new(env: Vec<(String, String)>, args: &[&str], dir: PathBuf, prefix: &str) -> anyhow::Result<Self> {
        let exe = match std::env::var_os("GE_REPLICA_BIN") {
            Some(bin) => PathBuf::from(bin),
            None => std::env::current_exe().context("finding this binary")?,
        };
        Ok(ReplicaProcs {
            exe,
            env,
            args: args.iter().map(|s| s.to_string()).collect(),
            dir,
            prefix: prefix.to_string(),
            procs: Vec::new(),
            generation: 0,
            slot_env: Default::default(),
        })
    }

    /// Sets `vars` for every replica started in `slot` from now on, over the common ones.
    pub fn set_slot_env(&mut self, slot: usize, vars: Vec<(String, String)>) {
        self.slot_env.insert(slot, vars);
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// Starts a replica in `slot` (a new one at the end, or in place of one that exited).
    /// Every start gets a new consumer name, as a restarted pod would.
    pub fn spawn(&mut self, slot: usize) -> anyhow::Result<()> {
        self.generation += 1;
        let name = format!("{}-{slot}-{}", self.prefix, self.generation);
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["run", "--consumer", &name])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(self.slot_env.get(&slot).into_iter().flatten().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting a replica")?;
        if slot < self.procs.len() {
            self.procs[slot] = (name, child);
        } else {
            self.procs.push((name, child));
        }
        Ok(())
    }

    pub fn name(&self, slot: usize) -> &str {
        &self.procs[slot].0
    }

    pub fn pid(&self, slot: usize) -> Option<u32> {
        self.procs[slot].1.id()
    }

    /// Sends `sig` to the replica in `slot`; returns its consumer name.
    pub(crate) fn signal(&self, slot: usize, sig: i32) -> String {
        let (name, child) = &self.procs[slot];
        // SAFETY: plain kill(2) on our own child.
        child.id().map(|pid| unsafe { libc::kill(pid as i32, sig) });
        name.clone()
    }

    /// kill -9, then waits until the process is gone.
    pub async fn kill(&mut self, slot: usize) -> String {
        let name = self.signal(slot, libc::SIGKILL);
        let _ = self.procs[slot].1.wait().await;
        name
    }

    /// Peak resident set size of the replica in `slot`, in bytes (Linux VmHWM).
    pub(crate) fn peak_rss(&self, slot: usize) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(slot)?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM to every replica, then waits for each to drain and exit.
    pub(crate) async fn stop_all(&mut self, timeout: Duration) {
        for slot in 0..self.procs.len() {
            self.signal(slot, libc::SIGTERM);
        }
        for (_, c) in &mut self.procs {
            let _ = tokio::time::timeout(timeout, c.wait()).await;
        }
    }
}

/// Time from `killed` until the killed replica's consumer has left the group on every input
/// stream, which a survivor does once it has taken over its entries; None after 60 s.
pub(crate) async fn left_group(endpoint: streams::Endpoint, consumer: String, killed: Instant) -> Option<Duration> {
    let names = Names::default();
    let deadline = killed + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut c) = streams::MasterConnection::connect(&endpoint).await {
            let mut present = false;
            let mut answered = true;
            for input in Input::ALL {
                match streams::group_consumers(&mut c, input.stream_in(&names), &names.group).await {
                    Ok(cs) => present |= cs.iter().any(|(n, _)| *n == consumer),
                    Err(_) => answered = false,
                }
            }
            if answered && !present {
                return Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
