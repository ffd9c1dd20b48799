//! Network faults between one replica and what it stands on. With any of them asked for, every
//! replica reaches Redis and PostgreSQL through two proxies of its own (`tools::proxy`), which
//! a fault cuts, slows or resets; the agents, the producer and the checks connect directly.

use std::time::Duration;

use crate::tools::procs::ReplicaProcs;
use crate::tools::proxy::TcpProxy;

/// The fault kinds of this file, as `--faults` names them.
pub(crate) const KINDS: [&str; 5] = ["redis-cut", "postgres-cut", "redis-partition", "slow", "reset"];

/// How long a cut lasts when it is meant to outlive the replica's lease (2 s) and the
/// PostgreSQL grace (`GE_POSTGRES_LOST_AFTER`, 2 s), and how long a link stays slow.
const LONG: Duration = Duration::from_secs(5);
/// A cut the replica rides out without being taken over: shorter than its lease.
const SHORT: Duration = Duration::from_secs(1);
const DELAY: Duration = Duration::from_millis(200);

/// The proxies of each replica slot: (to Redis, to PostgreSQL).
pub(crate) struct Links {
    slots: Vec<(TcpProxy, TcpProxy)>,
}

/// `url` with the port after `127.0.0.1:` replaced.
fn with_port(url: &str, port: u16) -> anyhow::Result<String> {
    let at = url.find("127.0.0.1:").ok_or_else(|| anyhow::anyhow!("no 127.0.0.1 in {url}"))? + "127.0.0.1:".len();
    let end = url[at..].find(|c: char| !c.is_ascii_digit()).map_or(url.len(), |n| at + n);
    Ok(format!("{}{port}{}", &url[..at], &url[end..]))
}

fn port_of(url: &str) -> anyhow::Result<u16> {
    let at = url.find("127.0.0.1:").ok_or_else(|| anyhow::anyhow!("no 127.0.0.1 in {url}"))? + "127.0.0.1:".len();
    let end = url[at..].find(|c: char| !c.is_ascii_digit()).map_or(url.len(), |n| at + n);
    Ok(url[at..end].parse()?)
}

impl Links {
    /// Two proxies per slot, and each slot's replicas pointed at them.
    pub(crate) async fn start(replicas: &mut ReplicaProcs, slots: usize, redis_url: &str, database_url: &str) -> anyhow::Result<Links> {
        let (redis_port, pg_port) = (port_of(redis_url)?, port_of(database_url)?);
        let mut out = Vec::new();
        for slot in 0..slots {
            let (redis, pg) = (TcpProxy::start(redis_port).await?, TcpProxy::start(pg_port).await?);
            replicas.set_slot_env(
                slot,
                vec![
                    ("REDIS_URL".into(), with_port(redis_url, redis.port())?),
                    ("DATABASE_URL".into(), with_port(database_url, pg.port())?),
                ],
            );
            out.push((redis, pg));
        }
        Ok(Links { slots: out })
    }

    /// Injects `kind` on `slot`'s links and heals them; returns the fault's name for the table.
    pub(crate) async fn inject(&self, kind: &str, slot: usize) -> anyhow::Result<&'static str> {
        let (redis, pg) = &self.slots[slot];
        Ok(match kind {
            "redis-cut" => {
                redis.cut();
                tokio::time::sleep(SHORT).await;
                redis.heal();
                "replica cut from Redis 1 s"
            }
            "redis-partition" => {
                redis.cut();
                tokio::time::sleep(LONG).await;
                redis.heal();
                "replica cut from Redis 5 s, PostgreSQL kept"
            }
            "postgres-cut" => {
                pg.cut();
                tokio::time::sleep(LONG).await;
                pg.heal();
                "replica cut from PostgreSQL 5 s"
            }
            "slow" => {
                redis.slow(DELAY);
                pg.slow(DELAY);
                tokio::time::sleep(LONG).await;
                redis.heal();
                pg.heal();
                "replica's links slow (200 ms each way) 5 s"
            }
            "reset" => {
                redis.reset_mid_reply();
                pg.reset_mid_reply();
                "replica's connections reset mid-reply"
            }
            other => anyhow::bail!("unknown network fault {other:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_found_and_replaced() {
        assert_eq!(port_of("postgres://postgres@127.0.0.1:5433/chaos").unwrap(), 5433);
        assert_eq!(with_port("postgres://postgres@127.0.0.1:5433/chaos", 7).unwrap(), "postgres://postgres@127.0.0.1:7/chaos");
        assert_eq!(with_port("redis://127.0.0.1:6379", 8).unwrap(), "redis://127.0.0.1:8");
    }
}
