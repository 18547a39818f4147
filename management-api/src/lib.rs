//! Tessera management API.
