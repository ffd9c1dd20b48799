//! `submit --wait`: a progress bar over a plan's work packages until each is completed,
//! failed or cancelled.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::core::status::{FINISHED, STATUSES};
use crate::ops::reads;

/// "3 completed, 1 dispatched, 2 blocked": the counts, in the order of a work package's life.
fn summary(st: &BTreeMap<String, String>, total: usize) -> String {
    let mut parts = Vec::new();
    for s in STATUSES {
        let n = st.values().filter(|v| v.as_str() == s).count();
        if n > 0 {
            parts.push(format!("{n} {s}"));
        }
    }
    if st.len() < total {
        parts.push(format!("{} not ingested yet", total - st.len()));
    }
    parts.join(", ")
}

/// Polls until every work package is finished (or Ctrl-C). Exits 1 when any failed or was
/// cancelled, naming them. A failed one holds the plan until an operator acts, so the bar
/// says so instead of waiting silently.
pub(crate) async fn wait_for_plan(pool: &PgPool, ids: &[String], token: CancellationToken) -> anyhow::Result<ExitCode> {
    let bar = ProgressBar::with_draw_target(Some(ids.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30.green/white}] {pos}/{len} finished  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let st = loop {
        let st = reads::statuses_of(pool, ids).await?;
        let finished = st.values().filter(|s| FINISHED.contains(&s.as_str())).count();
        bar.set_position(finished as u64);
        let mut msg = summary(&st, ids.len());
        if st.values().any(|s| s == "failed") {
            msg.push_str("  (a failed work package waits for `retry`, `skip` or `cancel`)");
        }
        bar.set_message(msg);
        if finished == ids.len() {
            break st;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = token.cancelled() => {
                bar.abandon_with_message("stopped waiting; the plan goes on");
                return Ok(ExitCode::from(130));
            }
        }
    };
    bar.finish_with_message(summary(&st, ids.len()));
    let bad: Vec<String> = st.iter().filter(|(_, s)| s.as_str() != "completed").map(|(w, s)| format!("{w} ({s})")).collect();
    if bad.is_empty() {
        println!("plan finished: {} completed", ids.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("plan finished with {} not completed: {}", bad.len(), bad.join(", "));
        Ok(ExitCode::FAILURE)
    }
}
