//! The node's command interface: the [`Command`]s its event loop takes, and [`NodeHandle`],
//! the cloneable handle that sends them and waits for the replies.
//!
//! This is all the HTTP routers ([`crate::api`], [`crate::serve::http`]) and the CLI see of
//! a running node: they depend on this module, never on the event loop. Commands for tests
//! and benchmarks only are [`DebugCommand`]s, behind `--debug-api`.

use super::error::NodeError;
use crate::data_plane::DataPlane;
use crate::status::StatusReport;
use coordinator_free::codec::ServeAnnounce;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Requests to the event loop.
pub enum Command {
    /// Report the node's status.
    Status(oneshot::Sender<StatusReport>),
    /// The data plane and the view it is bound to.
    DataPlane(oneshot::Sender<(DataPlane, coordinator_free::View)>),
    /// Publish an NCCL unique id for the current view (only its root may).
    PublishNcclId(Vec<u8>, oneshot::Sender<Result<(), String>>),
    /// The NCCL unique id received for a view, if any.
    /// Replies once it has arrived; dropped (no reply) if the view changes first.
    NcclId(coordinator_free::ViewHash, oneshot::Sender<Vec<u8>>),
    /// New local capabilities (from the periodic detection task).
    SetCapabilities(coordinator_free::Capabilities),
    /// Start a training job here and announce it to the swarm.
    SubmitJob {
        /// The job (validated, paths resolved).
        spec: Box<crate::train::job::JobSpec>,
        /// Continue from the checkpoint.
        resume: bool,
        /// The reply: the job's report.
        reply: oneshot::Sender<Result<crate::train::JobReport, String>>,
    },
    /// Announce a model this node now offers to the swarm at once (the event loop also
    /// re-announces every model the server holds, every 2 s).
    OfferModel {
        /// The announcement the server made of the model.
        announce: Box<ServeAnnounce>,
        /// The reply: whether it was published (an error says why not, e.g. no peers yet).
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// For tests and benchmarks (`--debug-api`).
    Debug(DebugCommand),
    /// Stop the node.
    Shutdown,
}

/// Requests to the event loop that only the debug API makes (`--debug-api`: tests and
/// benchmarks).
pub enum DebugCommand {
    /// Publish raw bytes on the control topic (tests send malformed gossip with it).
    PublishRaw(Vec<u8>, oneshot::Sender<Result<(), String>>),
    /// Nudge this node's weights in a run (to exercise the consistency check).
    PerturbJob(String, u8, oneshot::Sender<bool>),
}

/// A cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
}

impl NodeHandle {
    /// A handle sending to the event loop that receives from `tx`'s channel.
    pub(super) fn new(tx: mpsc::Sender<Command>) -> NodeHandle {
        NodeHandle { tx }
    }

    /// Sends a command built around a reply channel and waits for the reply.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(command(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// The node's status.
    pub async fn status(&self) -> Result<StatusReport, NodeError> {
        self.ask(Command::Status).await
    }

    /// The node's data plane and its current view.
    pub async fn data_plane(&self) -> Result<(DataPlane, coordinator_free::View), NodeError> {
        self.ask(Command::DataPlane).await
    }

    /// Publishes the NCCL unique id of the current view (this node must be its root).
    pub async fn publish_nccl_id(&self, id: Vec<u8>) -> Result<Result<(), String>, NodeError> {
        self.ask(|tx| Command::PublishNcclId(id, tx)).await
    }

    /// Waits, at most `bound`, for the NCCL unique id of `view` to arrive from its root.
    /// `None` if it did not arrive in time or the view changed meanwhile.
    pub async fn nccl_id(
        &self,
        view: coordinator_free::ViewHash,
        bound: Duration,
    ) -> Result<Option<Vec<u8>>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::NcclId(view, tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        Ok(tokio::time::timeout(bound, rx)
            .await
            .ok()
            .and_then(Result::ok))
    }

    /// Hands the event loop freshly detected capabilities; they go out with the next
    /// heartbeat.
    pub(super) async fn set_capabilities(
        &self,
        caps: coordinator_free::Capabilities,
    ) -> Result<(), NodeError> {
        self.tx
            .send(Command::SetCapabilities(caps))
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Starts a training job on this node and announces it to the swarm.
    pub async fn submit_job(
        &self,
        spec: crate::train::job::JobSpec,
        resume: bool,
    ) -> Result<Result<crate::train::JobReport, String>, NodeError> {
        self.ask(|reply| Command::SubmitJob {
            spec: Box::new(spec),
            resume,
            reply,
        })
        .await
    }

    /// Announces a model this node offers (the server's announcement of it) to the swarm
    /// at once, rather than at the next periodic re-announcement.
    pub async fn offer_model(
        &self,
        announce: ServeAnnounce,
    ) -> Result<Result<(), String>, NodeError> {
        self.ask(|reply| Command::OfferModel {
            announce: Box::new(announce),
            reply,
        })
        .await
    }

    /// Debug: publishes raw bytes on the control topic.
    pub async fn debug_publish_raw(&self, bytes: Vec<u8>) -> Result<Result<(), String>, NodeError> {
        self.ask(|tx| Command::Debug(DebugCommand::PublishRaw(bytes, tx)))
            .await
    }

    /// Debug: nudges this node's weights in run `run` (hex); false if the run is unknown.
    pub async fn debug_perturb_job(&self, run: String, kind: u8) -> Result<bool, NodeError> {
        self.ask(|tx| Command::Debug(DebugCommand::PerturbJob(run, kind, tx)))
            .await
    }

    /// Asks the node to stop.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}
