//! The binary's error: an `anyhow` error with the exit code it maps to (1 at run time,
//! 2 for bad usage or bad input).

/// An error with the exit code it maps to.
pub struct Failure {
    /// The process's exit code.
    pub code: u8,
    /// What went wrong (printed as one line on stderr).
    pub err: anyhow::Error,
}

/// Bad usage or bad input: exit code 2.
pub fn usage(err: anyhow::Error) -> Failure {
    Failure { code: 2, err }
}

impl From<anyhow::Error> for Failure {
    /// A failure at run time: exit code 1.
    fn from(err: anyhow::Error) -> Self {
        Failure { code: 1, err }
    }
}

impl From<shoal_node::local::LocalError> for Failure {
    /// A local cluster that could not start or agree: exit code 1 (2 for no nodes).
    fn from(e: shoal_node::local::LocalError) -> Self {
        match e {
            shoal_node::local::LocalError::NoNodes => {
                usage(anyhow::anyhow!("--nodes must be at least 1"))
            }
            e => anyhow::Error::from(e).into(),
        }
    }
}
