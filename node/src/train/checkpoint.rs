//! Checkpoints live in [`crate::models::checkpoint`] (shared by training and serving);
//! this path re-exports them for the training loop.

pub use crate::models::checkpoint::*;
