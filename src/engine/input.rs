//! The input streams of the contract, and which loop reads each.

use crate::engine::context::Ctx;
use crate::engine::settings::Names;

/// The input streams of the contract: work, reports, and (v1.1) heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    Incoming,
    Completed,
    Failed,
    Heartbeat,
    /// (v1.6) Events that waiting work packages wait for.
    Events,
}

impl Input {
    pub(crate) const ALL: [Input; 5] = [Input::Incoming, Input::Completed, Input::Failed, Input::Heartbeat, Input::Events];

    pub fn stream<'a>(&self, ctx: &'a Ctx) -> &'a str {
        self.stream_in(&ctx.settings.names)
    }

    pub(crate) fn stream_in<'a>(&self, n: &'a Names) -> &'a str {
        match self {
            Input::Incoming => &n.incoming,
            Input::Completed => &n.completed,
            Input::Failed => &n.failed,
            Input::Heartbeat => &n.heartbeat,
            Input::Events => &n.events,
        }
    }

    pub(crate) fn loop_name(&self) -> &'static str {
        match self {
            Input::Incoming => "route_incoming",
            Input::Completed | Input::Failed => "process_completions",
            Input::Heartbeat => "process_heartbeats",
            Input::Events => "process_events",
        }
    }
}
