//! The three input streams of the contract, and which loop reads each.

use crate::engine::context::Ctx;
use crate::engine::settings::Names;

/// The three input streams of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    Incoming,
    Completed,
    Failed,
}

impl Input {
    pub(crate) const ALL: [Input; 3] = [Input::Incoming, Input::Completed, Input::Failed];

    pub fn stream<'a>(&self, ctx: &'a Ctx) -> &'a str {
        self.stream_in(&ctx.settings.names)
    }

    pub(crate) fn stream_in<'a>(&self, n: &'a Names) -> &'a str {
        match self {
            Input::Incoming => &n.incoming,
            Input::Completed => &n.completed,
            Input::Failed => &n.failed,
        }
    }

    pub(crate) fn loop_name(&self) -> &'static str {
        match self {
            Input::Incoming => "route_incoming",
            Input::Completed | Input::Failed => "process_completions",
        }
    }
}
