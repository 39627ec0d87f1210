//! shoal-suite: integration tests and benches live in tests/ and benches/.
