//! shoal's I/O shell: adapts the sans-IO core in `coordinator_free` to the world. The map of
//! the whole code (tree, modules, a training step and a completion request walked through):
//! `docs/architecture.md`.
//!
//! - [`allocator`]: glibc's allocator set for tensor work, and freed memory given back when
//!   a piece of work ends.
//! - [`identity`]: the node's persistent key, incarnation counter and swarm key on disk.
//! - [`capabilities`]: what this machine offers (cores, RAM, GPUs).
//! - [`device`]: which device a member computes on (`auto`, `cpu`, `cuda:N`) and its
//!   free memory.
//! - [`control_plane`]: the libp2p swarm (transports, behaviours, limits).
//! - [`data_plane`]: member-to-member links (QUIC or TCP) and the collectives over them.
//! - [`node`]: the one event loop per node and its cloneable command handle.
//! - [`api`]: the local HTTP JSON control API on 127.0.0.1.
//! - [`metrics`]: the Prometheus text rendering behind `GET /metrics`.
//! - [`status`]: the status report, its table form, and a tiny client for the local API.
//! - `nccl` (feature `nccl`): NCCL collectives on CUDA tensors.
//! - [`models`]: model definitions shared by training and serving (mlp, gpt, TorchScript,
//!   checkpoints, the serving stage executor).
//! - [`train`]: data-parallel training jobs (job files, data, the training loop).
//! - [`serve`]: serving models: pipeline stages, batching, caching, the OpenAI API.
//! - [`text`]: Hugging Face tokenizers, streaming detokenisation and chat templates.
//! - [`local`]: local clusters of `shoal up` processes and the bounded wait for one agreed
//!   view (the CLI, the benchmarks, the end-to-end tests).

pub mod allocator;
pub mod api;
pub mod capabilities;
pub mod control_plane;
pub mod data_plane;
pub mod device;
pub mod identity;
pub mod local;
pub mod metrics;
pub mod models;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod node;
pub mod serve;
pub mod status;
pub mod text;
pub mod train;
