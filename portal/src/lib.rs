//! Tessera's portal: participant login and OWT Client-Portal signaling over Socket.IO.
