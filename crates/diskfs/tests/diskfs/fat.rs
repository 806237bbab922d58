//! fat tests (to come)
