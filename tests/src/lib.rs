//! End-to-end tests for umlctl live in `tests/`; this library is empty.
