//! The event loop's side of the debug API (`--debug-api`, for tests and benchmarks):
//! publishing raw bytes on the control topic (malformed gossip) and perturbing a training
//! run. Nothing on a normal path goes through here.

use super::event_loop::EventLoop;
use super::handle::DebugCommand;

impl EventLoop {
    /// Carries out one debug command.
    pub(super) fn on_debug_command(&mut self, cmd: DebugCommand) {
        match cmd {
            DebugCommand::PublishRaw(bytes, reply) => {
                let _ = reply.send(self.publish(bytes));
            }
            DebugCommand::PerturbJob(run, kind, reply) => {
                let _ = reply.send(self.jobs.perturb(&run, kind));
            }
        }
    }
}
