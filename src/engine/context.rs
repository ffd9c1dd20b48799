//! What every loop of a replica shares: settings, connections, the routing in force, counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sqlx::PgPool;

use crate::core::routing_file::RoutingTable;
use crate::engine::settings::RunSettings;

/// The routing table in force. A reload swaps the whole table at once; readers hold an `Arc`
/// to the table they started with.
#[derive(Clone)]
pub struct SharedRouting(Arc<RwLock<Arc<RoutingTable>>>);

impl SharedRouting {
    pub fn new(table: RoutingTable) -> Self {
        SharedRouting(Arc::new(RwLock::new(Arc::new(table))))
    }
    pub fn get(&self) -> Arc<RoutingTable> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
    pub fn set(&self, table: RoutingTable) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = Arc::new(table);
    }
}

/// Counters reported in `system.health`.
#[derive(Default)]
pub struct Stats {
    pub routed: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub deadlettered: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Unix seconds of the last loop error; drives `status=degraded`.
    pub last_error_at: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    pub(crate) fn note_error(&self) {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        self.last_error_at.store(now, Ordering::Relaxed);
    }
}

pub struct Ctx {
    pub settings: RunSettings,
    pub consumer: String,
    /// The engine's connections: ingest, completions, dispatch, the operators' changes.
    pub pool: PgPool,
    /// The operators' reads (admin API, /metrics, the dashboard, /readyz): a few connections
    /// of their own, so that however many slow reads pile up, the engine's are free.
    pub ops_pool: PgPool,
    /// Where Redis is: every connection (the readers', the pub/sub) is made through it, so
    /// that each follows a failover.
    pub endpoint: crate::engine::streams::Endpoint,
    /// The connection the loops share, to the master of the moment.
    pub redis: crate::engine::streams::MasterConnection,
    pub routing: SharedRouting,
    pub stats: Stats,
    /// Set once the consumer group exists on every input stream; drives `/readyz`.
    pub group_joined: AtomicBool,
    /// Work packages this replica held at the lane gate. Whatever another replica was still
    /// ingesting is usually done by this replica's next round, which looks at them again
    /// instead of leaving them to the scheduler's sweep.
    pub gate_held: std::sync::Mutex<Vec<String>>,
    /// Where the scheduler's next sweep of blocked work packages starts (their incoming order).
    pub sweep_from: std::sync::Mutex<(i64, i64)>,
    /// The routing file's version under which this replica last routed open work again
    /// (`dispatch::reroute_open_work`); None until it has once.
    pub rerouted_for: std::sync::Mutex<Option<String>>,
    /// This replica's Prometheus counters and histograms.
    pub metrics: crate::engine::metrics::Metrics,
    /// On duty, or standing down (PostgreSQL lost) with the reason; drives the reading loops,
    /// the lease and `/readyz`.
    pub duty: crate::engine::duty::Duty,
    /// (v1.6) Whether plans have budgets, as this replica last saw: rounds skip the budget
    /// locks while none has.
    pub plan_budgets: crate::engine::budgets::PlanBudgetsSeen,
}

impl Ctx {
    /// Acknowledges `ids` on `stream` together with the dead letters for some of them (one
    /// MULTI/EXEC), then counts and logs the dead letters.
    pub(crate) async fn ack(
        &self,
        stream: &str,
        ids: &[String],
        deadletters: &[crate::engine::streams::DeadLetter],
    ) -> redis::RedisResult<()> {
        let names = &self.settings.names;
        let mut redis = self.redis.clone();
        crate::engine::streams::ack_with_deadletters(
            &mut redis,
            stream,
            &names.group,
            ids,
            deadletters,
            &names.deadletter,
            self.deadletter_bounds(),
        )
        .await?;
        self.note_deadletters(deadletters);
        Ok(())
    }

    /// The `agent` label of a dead letter. Its `agent_id` is whatever a producer wrote, and each
    /// distinct label value is a series the recorder keeps forever, so only the routing file's
    /// agents name themselves; any other name is `other`, and none stays empty.
    fn agent_label(&self, agent: Option<&str>) -> String {
        match agent {
            None | Some("") => String::new(),
            Some(a) if self.routing.get().agents.contains_key(a) => a.to_string(),
            Some(_) => "other".into(),
        }
    }

    /// What a dead letter keeps of an entry, from the settings.
    pub(crate) fn deadletter_bounds(&self) -> crate::engine::streams::DeadLetterBounds {
        crate::engine::streams::DeadLetterBounds::of(&self.settings)
    }

    /// Counts and logs dead letters written (health counters, `/metrics`, one log line each).
    pub(crate) fn note_deadletters(&self, dls: &[crate::engine::streams::DeadLetter]) {
        Stats::add(&self.stats.deadlettered, dls.len() as u64);
        for dl in dls {
            let field = |name: &[u8]| dl.fields.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            let (agent, wp_id, dispatch_id) = (field(b"agent_id"), field(b"wp_id"), field(b"dispatch_id"));
            self.metrics.deadlettered(&dl.reason, &self.agent_label(agent.as_deref()));
            tracing::warn!(
                wp_id = wp_id.as_deref().unwrap_or(""),
                dispatch_id = dispatch_id.as_deref().unwrap_or(""),
                reason = %dl.reason,
                stream = %dl.stream,
                source_id = %dl.source_id,
                detail = %dl.detail,
                "dead-lettering an entry"
            );
        }
    }
}
